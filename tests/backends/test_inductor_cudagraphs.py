"""Option ``cudagraphs``: checked with the options, handed to Inductor only for graphs on a CUDA device, outputs copied.

No GPU here: a recording stand-in replaces ``compile_fx``, and fake tensors stand for CUDA inputs.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from flashu_compile.backends import inductor
from flashu_compile.backends.inductor import InductorSettings, copied_outputs, lower_inductor
from flashu_compile.backends.lowerings import lowering_for
from flashu_compile.options import FlashUOptions


def test_option_is_a_bool_for_the_inductor_lowering():
    assert FlashUOptions().cudagraphs is False
    assert FlashUOptions.from_dict({"preset": "paper", "cudagraphs": True}).cudagraphs is True
    with pytest.raises(ValueError, match="option 'cudagraphs' must be a bool, got int 1"):
        FlashUOptions.from_dict({"cudagraphs": 1})
    with pytest.raises(ValueError, match="option 'cudagraphs' needs lowering='inductor'.*got lowering='eager'"):
        FlashUOptions.from_dict({"cudagraphs": True, "lowering": "eager"})


def test_lowering_for_carries_the_setting():
    assert lowering_for(FlashUOptions()) == "inductor"
    assert lowering_for(FlashUOptions(cudagraphs=True)) == InductorSettings(cudagraphs=True)


@pytest.fixture
def recorded(monkeypatch):
    """Calls of compile_fx as (CUDA graphs asked for, input devices); each compiles to the graph's own forward."""
    calls = []

    def compile_fx(gm, example_inputs, config_patches=None):
        # Only the CUDA-graph setting: the lowering may patch other settings for its own reasons.
        calls.append(((config_patches or {}).get("triton.cudagraphs", False), [x.device.type for x in example_inputs]))
        return gm.forward

    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx", compile_fx)
    return calls


def _graph() -> torch.fx.GraphModule:
    return torch.fx.symbolic_trace(lambda x: (x * 2 + 1,))


def test_cpu_graph_is_compiled_without_cuda_graphs_and_a_warning(recorded):
    with pytest.warns(UserWarning, match="cudagraphs=True is ignored for a graph whose inputs are not on a CUDA"):
        fn = lower_inductor(_graph(), [torch.ones(3)], InductorSettings(cudagraphs=True))
    assert recorded == [(False, ["cpu"])]
    assert torch.equal(fn(torch.ones(3))[0], torch.full((3,), 3.0))


def test_cuda_graph_gets_the_inductor_config_and_copied_outputs(recorded):
    with FakeTensorMode():
        cuda_input = torch.empty(3, device="cuda")
    fn = lower_inductor(_graph(), [cuda_input], InductorSettings(cudagraphs=True))
    assert recorded == [(True, ["cuda"])]
    assert fn.__name__ == "run"  # the copying wrapper, not the graph's forward
    lower_inductor(_graph(), [cuda_input])
    assert recorded[-1] == (False, ["cuda"])  # without the setting, none


def test_copied_outputs_are_the_callers_own_in_either_calling_convention():
    static = torch.zeros(2)

    def replay(*args):  # like a replayed CUDA graph: the same output memory every time
        static.copy_(args[0])
        return (static, 3)

    run = copied_outputs(replay)
    first = run(torch.ones(2))[0]
    run(torch.full((2,), 5.0))
    assert torch.equal(first, torch.ones(2)) and first.data_ptr() != static.data_ptr()

    def boxed(args):
        return replay(*args)

    boxed._boxed_call = True
    wrapped = copied_outputs(boxed)
    out, three = wrapped([torch.full((2,), 7.0)])
    assert wrapped._boxed_call and three == 3 and torch.equal(out, torch.full((2,), 7.0))
    assert out.data_ptr() != static.data_ptr()


def test_settings_key_programs():
    assert InductorSettings(cudagraphs=True) != InductorSettings() and hash(InductorSettings(cudagraphs=True))
    assert inductor.on_cuda([torch.ones(1), 3]) is False
