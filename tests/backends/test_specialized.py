"""Guard-free decode graphs for a settled skip set: same results as the guarded graph, bounded, with a fallback."""

import pytest
import torch
from transformers import DynamicCache

from flashu_compile.backends import specialized
from flashu_compile.backends.specialized import Specializations
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
