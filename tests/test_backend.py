import copy
import dataclasses
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from flashu_compile import StrictModeError
from flashu_compile.backend import build_pass_list, flashu_backend
from flashu_compile.backends.tensorrt import tensorrt_unavailable_reason
from flashu_compile.models.showo2 import Showo2
from flashu_compile.models.showo2.understanding import answer_tokens
from flashu_compile.options import PASS_TASKS, PASSES, FlashUOptions
from flashu_compile.passes.registry import REGISTRY
from flashu_compile.tasks import compile_tasks
from tests.conftest import small_config
from tests.models.test_compile_friendly import t2i_inputs


def test_registered_through_the_entry_point_without_importing_the_package():
    script = textwrap.dedent("""
        import sys, torch
        m = torch.nn.Linear(3, 3)
        x = torch.randn(2, 3)
        out = torch.compile(m, backend="flashu", options={"lowering": "eager"})(x)
        assert "flashu_compile" in sys.modules  # loaded by dynamo through the entry point
        assert torch.equal(out, m(x))
        import flashu_compile, flashu_compile.backend  # importing again must not break the registry
        torch._dynamo.reset()
        out = torch.compile(m, backend="flashu", options={"lowering": "eager"})(x)
        assert torch.equal(out, m(x))
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_no_pass_eager_lowering_equals_eager(small_model, tokenizer):
    torch._dynamo.reset()
    inputs = t2i_inputs(small_model, tokenizer)
    fast = torch.compile(small_model.denoise, backend="flashu", options={"lowering": "eager"}, fullgraph=True)
    with torch.no_grad():
        assert torch.equal(fast(*inputs), small_model.denoise(*inputs))


def test_no_pass_inductor_lowering_matches_eager(small_model, tokenizer):
    torch._dynamo.reset()
    inputs = t2i_inputs(small_model, tokenizer)
    fast = torch.compile(small_model, backend="flashu")
    with torch.no_grad():
        logits, v = fast(*inputs)
        ref_logits, ref_v = small_model(*inputs)
    torch.testing.assert_close(v, ref_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


def test_every_option_pass_is_implemented_and_runs_in_canonical_order():
    assert list(REGISTRY) == list(PASSES) == list(PASS_TASKS)
    core = ["prune_channels", "token_drop", "prefix_cache", "layer_skip", "head_cache"]
    assert [name for name in PASSES if name in core] == core  # a new pass finds its place by its order alone
    opts = FlashUOptions(passes=("head_cache", "layer_skip", "token_drop", "prune_channels"))
    assert [name for name, _ in build_pass_list(opts)] == ["prune_channels", "token_drop", "layer_skip", "head_cache"]
    assert [name for name, _ in build_pass_list(opts, "t2i")] == ["prune_channels", "layer_skip", "head_cache"]
    assert [fn for _, fn in build_pass_list(opts, "mmu")] == [REGISTRY[n].fn for n in
                                                               ("prune_channels", "token_drop", "layer_skip")]


def test_bad_option_surfaces_from_torch_compile():
    torch._dynamo.reset()
    with pytest.raises(ValueError, match=r"unknown flashu option\(s\) \['lowerng'\]"):
        torch.compile(torch.nn.Linear(3, 3), backend="flashu", options={"lowerng": "eager"})(torch.randn(1, 3))
    torch._dynamo.reset()
    with pytest.raises(ValueError, match=r"option 'plan' must be a Plan or the path of a saved plan, got int 42"):
        torch.compile(torch.nn.Linear(3, 3), backend="flashu", options={"plan": 42})(torch.randn(1, 3))


def _with_changed_attention_weight(model):
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.showo.model.layers[1].self_attn.v_proj.weight[0, 0] += 0.25
    return changed


def test_a_plan_for_other_weights_is_a_plan_error_by_name_before_any_weight_moves(small_model, tokenizer, tmp_path):
    """Only an attention weight differs, so every FFN matches the plan: the graph's other weights tell."""
    from flashu_compile import PlanError
    from flashu_compile.calibrate import calibrate

    plan = calibrate(small_model, tasks=("t2i",), prompts=["a red circle"], steps=3, progress=False, multiple=8)
    path = plan.save(tmp_path / "plan")
    changed = _with_changed_attention_weight(small_model)
    before = {k: v.clone() for k, v in changed.state_dict().items()}
    for given in (path, plan):
        torch._dynamo.reset()
        fast = torch.compile(changed.denoise, backend="flashu",
                             options={"passes": ["prune_channels"], "plan": given, "lowering": "eager"})
        with pytest.raises(PlanError, match=r"weight l_self_modules_showo_.*layers_modules_1_.*v_proj.* is none of"):
            fast(*t2i_inputs(changed, tokenizer))
    # compile_tasks checks a Plan against the whole model at the call; a saved plan's path, in the graphs.
    with pytest.raises(PlanError, match=r"weights showo.model.layers.1.self_attn.v_proj.weight differ"):
        compile_tasks(changed, "flashu", {"passes": ["prune_channels"], "plan": plan, "lowering": "eager"})
    torch._dynamo.reset()
    compiled = compile_tasks(changed, "flashu", {"passes": ["prune_channels"], "plan": path, "lowering": "eager"})
    with pytest.raises(PlanError, match=r"v_proj.* is none of its weights"):
        compiled.generate_images("a red circle", steps=2, progress=False)
    assert all(torch.equal(v, changed.state_dict()[k]) for k, v in before.items())  # no FFN was permuted


def test_strict_mode_errors_arrive_by_name(small_model, tokenizer):
    from flashu_compile import StrictModeError

    torch._dynamo.reset()
    fast = torch.compile(small_model.denoise, backend="flashu",
                         options={"passes": ["token_drop"], "lowering": "eager", "strict": True})
    with pytest.raises(StrictModeError, match="flashu pass 'token_drop' does not apply"):
        fast(*t2i_inputs(small_model, tokenizer))


@pytest.mark.skipif(tensorrt_unavailable_reason() is None, reason="TensorRT is available: error path not reachable")
def test_tensorrt_lowering_explains_why_it_cannot_run():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(3, 3))
    with pytest.raises(RuntimeError, match="lowering='tensorrt' cannot be used: "):
        flashu_backend(gm, [torch.randn(1, 3)], {"lowering": "tensorrt"})


@pytest.mark.skipif(tensorrt_unavailable_reason() is not None,
                    reason=f"TensorRT lowering not runnable here: {tensorrt_unavailable_reason()}")
def test_tensorrt_lowering_matches_eager():
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()).cuda().eval()
    x = torch.randn(4, 8, device="cuda")
    torch._dynamo.reset()
    out = torch.compile(m, backend="flashu", options={"lowering": "tensorrt"})(x)
    torch.testing.assert_close(out, m(x), rtol=1e-3, atol=1e-3)


def test_not_applicable_graph_is_lowered_unchanged_or_rejected_in_strict_mode(monkeypatch):
    from flashu_compile.passes.manager import PassResult

    seen = []
    monkeypatch.setitem(REGISTRY, "layer_skip", dataclasses.replace(
        REGISTRY["layer_skip"], fn=lambda gm, index, opts: seen.append(index) or PassResult(False)))
    mlp = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    x = torch.randn(2, 3)
    gm = torch.fx.symbolic_trace(mlp)
    with pytest.warns(UserWarning, match="flashu passes skipped for this graph, not applicable: no decoder layer"):
        out = flashu_backend(gm, [x], {"passes": ["layer_skip"], "lowering": "eager"})(x)
    assert torch.equal(out, mlp(x)) and seen == []
    with pytest.raises(StrictModeError, match="flashu cannot rewrite this graph: not applicable"):
        flashu_backend(gm, [x], {"passes": ["layer_skip"], "lowering": "eager", "strict": True})


def test_the_cycle_collector_is_held_off_while_a_graph_compiles_and_restored_after(monkeypatch):
    import gc

    from flashu_compile import backend

    seen = []
    index = backend.build_index
    monkeypatch.setattr(backend, "build_index", lambda gm, inputs: seen.append(gc.isenabled()) or index(gm, inputs))
    mlp = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    x = torch.randn(2, 3)
    gm = torch.fx.symbolic_trace(mlp)
    options = {"passes": ["layer_skip"], "lowering": "eager"}
    assert gc.isenabled()
    with pytest.warns(UserWarning, match="flashu passes skipped for this graph"):
        flashu_backend(gm, [x], options)
    assert seen == [False] and gc.isenabled()
    with pytest.raises(StrictModeError):  # an error restores it too
        flashu_backend(gm, [x], {**options, "strict": True})
    assert seen == [False, False] and gc.isenabled()
    gc.disable()  # the caller's choice stays
    try:
        with pytest.warns(UserWarning):
            flashu_backend(gm, [x], options)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_compiled_tasks_do_not_recompile_across_steps_or_requests(tokenizer):
    from torch._dynamo.utils import counters

    from tests.conftest import small_config

    model = Showo2.random(small_config(), seed=1).attach(tokenizer=tokenizer)
    latents = torch.randn(1, 12, 8, 8, generator=torch.Generator().manual_seed(0))
    ref_image = model.generate_images(["red circle"], steps=50, guidance=5.0, seed=0, progress=False)
    ref_answer = answer_tokens(model, tokenizer, latents, "what colour is the circle?", max_new_tokens=32)
    torch._dynamo.reset()
    counters.clear()
    compiled = compile_tasks(model, options={"lowering": "eager"})

    image = compiled.generate_images(["red circle"], steps=50, guidance=5.0, seed=0, progress=False)
    assert counters["stats"]["unique_graphs"] == 1  # one denoising graph for all 49 calls
    answer = answer_tokens(model, tokenizer, latents, "what colour is the circle?", max_new_tokens=32,
                           entries=compiled.entries)
    # the embedding, the prefill, the first decode step, then one decode graph with a dynamic cache length.
    graphs = counters["stats"]["unique_graphs"]
    assert graphs <= 1 + 4
    for seed in (1, 2, 3):
        compiled.generate_images(["blue square"], steps=50, guidance=5.0, seed=seed, progress=False)
        assert answer_tokens(model, tokenizer, latents, "what colour is the circle?", max_new_tokens=32,
                             entries=compiled.entries) == answer
    assert counters["stats"]["unique_graphs"] == graphs  # 0 recompiles over 3 further requests
    assert torch.equal(image, ref_image) and answer == ref_answer and len(answer) == 32


def _hf_lm():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


# Each case: a pass asked for that cannot act on the graph compiled, and the reason it must give.
NOT_ACTING = {
    "task": ("denoise", {"passes": ["token_drop"]}, r"'token_drop' .*rewrites mmu graphs and this is a t2i graph"),
    "rounding": ("denoise", {"passes": ["layer_skip"], "skip_ratio": 0.2}, r"'layer_skip' .*int\(2 layers x "
                 r"skip_ratio 0.2\) skips no layer"),
    "no image": ("lm", {"passes": ["token_drop"]}, r"'token_drop' .*no marked image tokens"),
}


def _compile_and_call(which, options, small_model, tokenizer):
    torch._dynamo.reset()
    with torch.no_grad():
        if which == "lm":
            lm = _hf_lm()
            fast = torch.compile(lm, backend="flashu", options={**options, "lowering": "eager"})
            for _ in range(2):
                fast(input_ids=torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0)))
        else:
            fast = torch.compile(small_model.denoise, backend="flashu", options={**options, "lowering": "eager"})
            inputs = t2i_inputs(small_model, tokenizer)
            for _ in range(2):
                fast(*inputs)


@pytest.mark.parametrize("case", sorted(NOT_ACTING))
def test_a_pass_that_does_not_act_says_why_once(case, small_model, tokenizer):
    which, options, message = NOT_ACTING[case]
    with pytest.warns(UserWarning) as caught:
        _compile_and_call(which, options, small_model, tokenizer)
    said = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(said) == 1, said  # one compiled graph, called twice: one warning
    assert re.search(message, said[0]), said[0]


@pytest.mark.parametrize("case", sorted(NOT_ACTING))
def test_strict_turns_a_pass_that_does_not_act_into_an_error(case, small_model, tokenizer):
    which, options, message = NOT_ACTING[case]
    with pytest.raises(Exception, match=message):
        _compile_and_call(which, {**options, "strict": True}, small_model, tokenizer)


def test_compile_tasks_gives_each_entry_only_the_passes_that_act_on_it(tokenizer):
    model = Showo2.random(small_config(num_layers=4), seed=2).attach(tokenizer=tokenizer)
    torch._dynamo.reset()
    compiled = compile_tasks(model, "flashu", {"passes": ["token_drop", "layer_skip", "head_cache"], "skip_ratio": 0.5,
                                              "lowering": "eager", "strict": True})
    image = compiled.generate_images(["a red circle"], steps=4, guidance=2.0, progress=False)
    assert compiled.answer(image[0], "what colour is the circle?", max_new_tokens=3) is not None
