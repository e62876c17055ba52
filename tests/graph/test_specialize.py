"""resolve_layer_guards on the graphs the backend really rewrites."""

import torch

from flashu_compile import backend
from flashu_compile.graph.rewrite import copy_graph
from flashu_compile.graph.specialize import layer_guards, resolve_layer_guards
from flashu_compile.models.showo2 import Showo2
from flashu_compile.models.showo2.understanding import answer_tokens
from flashu_compile.tasks import compile_tasks
from tests.conftest import small_config
from tests.passes.reference import compiled_generate, latent_noise


def _rewritten(monkeypatch, run):
    """Every graph the flashu backend lowers while ``run()`` runs, as the passes left it."""
    graphs = []
    lower = backend.lower

    def capture(gm, example_inputs, lowering):
        graphs.append(copy_graph(gm))
        return lower(gm, example_inputs, lowering)

    monkeypatch.setattr(backend, "lower", capture)
    torch._dynamo.reset()
    run()
    return graphs


def _modules_called(gm):
    return sorted(n.target for n in gm.graph.nodes if n.op == "call_module")


def test_skipped_layers_leave_the_graph_and_kept_ones_are_plain_calls(tokenizer, monkeypatch):
    model = Showo2.random(small_config(num_layers=4), seed=2).attach(tokenizer=tokenizer)
    image = torch.randn(1, model.config.image_latent_dim, *model.config.latent_size)

    def run():
        compiled = compile_tasks(model, "flashu", {"passes": ["layer_skip"], "skip_ratio": 0.5, "lowering": "eager",
                                                  "decode_graphs": 0})
        with torch.no_grad():
            answer_tokens(model, tokenizer, image, "what colour is the circle?", max_new_tokens=4,
                          entries=compiled.entries)

    prefill, *decodes = [gm for gm in _rewritten(monkeypatch, run) if layer_guards(gm)]  # not the embedding
    decode = decodes[-1]
    assert len(layer_guards(decode)) == 4
    skipped = resolve_layer_guards(decode, {1, 3})
    assert not layer_guards(skipped)
    assert _modules_called(skipped) == ["flashu_layer_0", "flashu_layer_2"]
    assert not hasattr(skipped, "flashu_layer_1") and hasattr(decode, "flashu_layer_1")  # the source is untouched
    assert _modules_called(resolve_layer_guards(decode, ())) == [f"flashu_layer_{i}" for i in range(4)]
    # A prefill's layers have no past to carry: none can be skipped, whatever the set says.
    assert _modules_called(resolve_layer_guards(prefill, {1, 3})) == [f"flashu_layer_{i}" for i in range(4)]


def test_no_single_graph_when_other_guards_remain(small_model, monkeypatch):
    """A generation graph's layer guards sit inside the head cache's guarded region, which decides per step."""
    def run():
        compiled_generate(small_model, {"passes": ["layer_skip", "head_cache"], "lowering": "eager"},
                          ["a red circle"], 3, latent_noise(small_model, 1))

    graphs = _rewritten(monkeypatch, run)
    assert graphs and all(resolve_layer_guards(gm, ()) is None for gm in graphs)
