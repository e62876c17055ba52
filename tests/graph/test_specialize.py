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

    def capture(gm, example_inputs, lowering, **kwargs):
        graphs.append(copy_graph(gm))
        return lower(gm, example_inputs, lowering, **kwargs)

    monkeypatch.setattr(backend, "lower", capture)
    torch._dynamo.reset()
    run()
    return graphs


def _own_inputs(decode):
    """Per layer index, the names of the tensors only that layer's guard reads and does not carry when the layer is
    skipped (its weights, not its past keys and values)."""
    guards = layer_guards(decode)
    readers: dict[str, int] = {}
    for g in guards:
        for x in set(g.args[4:]):
            readers[x.name] = readers.get(x.name, 0) + 1
    return {g.args[2]: {x.name for k, x in enumerate(g.args[4:]) if readers[x.name] == 1 and k not in g.args[3]
                        and isinstance(x.meta.get("example_value"), torch.Tensor)}
            for g in guards}


def _read(gm):
    """Names of the nodes of ``gm`` that some node reads."""
    return {x.name for n in gm.graph.nodes for x in n.all_input_nodes}


def test_skipped_layers_leave_the_graph_and_kept_ones_are_inlined(tokenizer, monkeypatch):
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
    own = _own_inputs(decode)
    assert sorted(own) == [0, 1, 2, 3] and all(own.values())
    for graph, kept in [(decode, (0, 2)), (prefill, (0, 1, 2, 3))]:
        flat = resolve_layer_guards(graph, {1, 3})
        # One flat graph of operations: no guard, no call of a block, no block kept as a submodule.
        assert not layer_guards(flat)
        assert not [n for n in flat.graph.nodes if n.op in ("call_module", "get_attr")]
        assert not [name for name, _ in flat.named_children()]
        read = _read(flat)
        # A kept layer's weights are read by its inlined operations; a skipped one's by nothing. A prefill's layers
        # have no past to carry: none can be skipped, whatever the set says.
        for i, names in _own_inputs(graph).items():
            assert (names <= read) if i in kept else not (names & read), i
    assert hasattr(decode, "flashu_layer_1")  # the source is untouched
    assert not [n for n in resolve_layer_guards(decode, ()).graph.nodes if n.op == "call_module"]


def test_no_single_graph_when_other_guards_remain(small_model, monkeypatch):
    """A generation graph's layer guards sit inside the head cache's guarded region, which decides per step."""
    def run():
        compiled_generate(small_model, {"passes": ["layer_skip", "head_cache"], "lowering": "eager"},
                          ["a red circle"], 3, latent_noise(small_model, 1))

    graphs = _rewritten(monkeypatch, run)
    assert graphs and all(resolve_layer_guards(gm, ()) is None for gm in graphs)
