"""Guard-free decode graphs for a settled skip set: same results as the guarded graph, bounded, with a fallback."""

import warnings

import pytest
import torch
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensor
from transformers import DynamicCache

from flashu_compile.backends import inductor, specialized
from flashu_compile.backends.specialized import Specializations
from flashu_compile.graph.rewrite import is_symbolic
from flashu_compile.models.showo2 import Showo2
from flashu_compile.models.showo2.understanding import answer_tokens, prepare
from flashu_compile.runtime.request import request
from flashu_compile.tasks import compile_tasks
from tests.conftest import small_config
from tests.passes.reference import reference_answer

QUESTION = "what colour is the circle?"


def _model(tokenizer, num_layers=4, seed=2):
    model = Showo2.random(small_config(num_layers=num_layers), seed=seed).attach(tokenizer=tokenizer)
    c, (h, w) = model.config.image_latent_dim, model.config.latent_size
    return model, torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(seed))


def _decode(model, tokenizer, image, options, steps):
    """Every decode step's logits, feeding back the argmax, and how many entries each layer's cache gained."""
    torch._dynamo.reset()
    compiled = compile_tasks(model, "flashu", options)
    rows, embeds = prepare(model, tokenizer, image, QUESTION)
    cache = DynamicCache(config=model.config.llm)
    out = []
    with torch.no_grad(), request("mmu", steps + 1) as req:
        req.advance()
        logits = compiled.entries["prefill"](model, embeds, rows.attention_mask, cache, rows.image_positions())
        prompt = [lay.keys.shape[2] for lay in cache.layers]
        for _ in range(steps):
            req.advance()
            logits = compiled.entries["decode"](model, logits.argmax(-1), cache)
            out.append(logits)
    return out, [lay.keys.shape[2] - n for lay, n in zip(cache.layers, prompt, strict=True)]


@pytest.mark.parametrize("passes", [["layer_skip"], ["token_drop", "layer_skip"]])
def test_specialized_decode_equals_the_guarded_one(tokenizer, builds, passes):
    model, image = _model(tokenizer)
    options = {"passes": passes, "skip_ratio": 0.5, "lowering": "eager", "token_drop_layer": 1, "strict": True}
    guarded, guarded_grown = _decode(model, tokenizer, image, {**options, "decode_graphs": 0}, steps=5)
    assert builds == []
    fast, grown = _decode(model, tokenizer, image, options, steps=5)
    # One skip set per answer: built once, on the first decode step of the graph that serves every length.
    assert len(builds) == 1 and len(builds[0]) == 2 and 0 not in builds[0]
    # Every layer's cache grows by a token per step, a skipped layer's by placeholders (runtime.guards.skipped_cache).
    assert grown == guarded_grown == [5] * 4
    for a, b in zip(fast, guarded, strict=True):
        assert torch.equal(a, b)


def test_least_recently_used_specialization_leaves_first():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(3, 3))
    cache = Specializations(gm, "eager", capacity=2, guarded=gm)
    a, b, c = frozenset({1}), frozenset({2}), frozenset({3})
    first = cache.get(a)
    cache.get(b)
    assert cache.get(a) is first  # a is now the most recently used
    cache.get(c)  # evicts b
    assert list(cache.programs) == [a, c] and cache.built == 3
    cache.get(b)
    assert list(cache.programs) == [c, b] and cache.built == 4


def test_a_specialization_that_fails_to_compile_falls_back_to_the_guarded_graph(tokenizer, builds, monkeypatch):
    def fail(gm, example_inputs, lowering):
        raise RuntimeError("no kernel for this")

    monkeypatch.setattr(specialized, "lower", fail)
    model, image = _model(tokenizer, num_layers=2, seed=0)
    _, want, _, _ = reference_answer(model, tokenizer, image, QUESTION, 6, skip_ratio=0.5)
    torch._dynamo.reset()
    compiled = compile_tasks(model, "flashu", {"passes": ["layer_skip"], "skip_ratio": 0.5})
    with torch.no_grad(), pytest.warns(UserWarning, match=r"specialized on skip set \[1\] failed .*no kernel"):
        assert answer_tokens(model, tokenizer, image, QUESTION, max_new_tokens=6, entries=compiled.entries) == want
    assert builds == [frozenset({1})]


class _Inductor:
    """Stands in for Inductor (it runs each piece eagerly) and records every compile: whether its inputs were
    symbolic fakes, and whether it ran inside a dynamo compile. ``assume`` makes each compile on symbolic fakes of
    one kind (``"specialization"``: the whole specialized step; ``"pieces"``: a piece of the guarded step) assume
    something of a symbol: it specializes the symbol to its value in this call."""

    def __init__(self, monkeypatch, assume: str | None = None) -> None:
        self.compiles: list[tuple[bool, bool]] = []  # (symbolic fakes, inside dynamo) per compile
        self.assume = assume
        monkeypatch.setattr(inductor, "lower_inductor", self)

    def __call__(self, gm, example_inputs, settings=None):
        leaves = [x for x in example_inputs if isinstance(x, torch.Tensor)]
        symbolic = any(isinstance(x, FakeTensor) and is_symbolic(x) for x in leaves)
        self.compiles.append((symbolic, torch._guards.CompileContext.current_compile_id() is not None))
        whole = sum(n.op == "placeholder" for n in gm.graph.nodes) > 20  # a whole decode step, not a layer piece
        if symbolic and self.assume == ("specialization" if whole else "pieces"):
            size = next(d for x in leaves for d in x.shape if isinstance(d, torch.SymInt))
            assert size == size.node.hint  # guards the symbol to this call's value
        return gm.forward


def _answer(model, tokenizer, image, options):
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    compiled = compile_tasks(model, "flashu", options)
    tokens = answer_tokens(model, tokenizer, image, QUESTION, max_new_tokens=6, entries=compiled.entries)
    return tokens, counters["stats"]["unique_graphs"] - before


def test_a_specialization_compiles_on_its_traces_symbols_and_the_guarded_step_only_if_called(tokenizer, monkeypatch):
    model, image = _model(tokenizer, num_layers=2, seed=0)
    _, want, _, _ = reference_answer(model, tokenizer, image, QUESTION, 6, skip_ratio=0.5)
    options = {"passes": ["layer_skip"], "skip_ratio": 0.5}
    guarded = _Inductor(monkeypatch)
    with torch.no_grad():
        tokens, frames = _answer(model, tokenizer, image, {**options, "decode_graphs": 0})
    assert tokens == want
    # The guarded step's pieces, for every cache length, compiled inside dynamo's compile of the step.
    assert [c for c in guarded.compiles if c[0]] and all(c == (True, True) for c in guarded.compiles if c[0])
    fast = _Inductor(monkeypatch)
    with torch.no_grad():
        tokens, fast_frames = _answer(model, tokenizer, image, options)
    assert tokens == want
    # No frame more than without specializations (dynamo does not trace the specialized step again), and the only
    # symbolic compile is the specialized step's, after dynamo's: the guarded step it stands in for never ran.
    assert fast_frames == frames
    assert [c for c in fast.compiles if c[0]] == [(True, False)]


@pytest.mark.parametrize("where", ["specialization", "pieces"])
def test_a_compile_after_the_trace_that_assumes_something_is_not_kept(tokenizer, monkeypatch, where):
    """Its code would hold only under a guard nobody checks: the specialization is traced by dynamo instead (one
    frame more, guarded as usual); the deferred guarded step (here run because the specialization failed) runs
    eagerly, with a warning."""
    model, image = _model(tokenizer, num_layers=2, seed=0)
    _, want, _, _ = reference_answer(model, tokenizer, image, QUESTION, 6, skip_ratio=0.5)
    options = {"passes": ["layer_skip"], "skip_ratio": 0.5}
    _Inductor(monkeypatch)
    with torch.no_grad():
        _, frames = _answer(model, tokenizer, image, options)
    _Inductor(monkeypatch, assume=where)
    if where == "pieces":
        monkeypatch.setattr(specialized, "resolve_layer_guards", lambda gm, skip: None)  # the guarded step serves
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens, assumed_frames = _answer(model, tokenizer, image, options)
    assert tokens == want
    said = [str(w.message) for w in caught if "assumed something" in str(w.message)]
    if where == "specialization":
        assert assumed_frames == frames + 1 and not said
    else:
        assert assumed_frames == frames and len(said) == 1
