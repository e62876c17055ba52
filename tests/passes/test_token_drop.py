"""token_drop against a hand-written eager prefill that drops the same tokens."""

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from flashu_compile.models.showo2 import Showo2
from flashu_compile.models.showo2.understanding import answer_tokens, prefill, prepare
from flashu_compile.passes.manager import observe_passes
from flashu_compile.runtime import FlopTally
from flashu_compile.runtime.flops import call_counted
from flashu_compile.tasks import compile_tasks
from tests.conftest import small_config
from tests.passes.reference import assert_close_rel, reference_answer, reference_token_drop_prefill

QUESTION = "what colour is the circle?"


def _image(model, seed):
    c, (h, w) = model.config.image_latent_dim, model.config.latent_size
    return torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(num_layers=st.integers(2, 4), data=st.data(), ratio=st.sampled_from([0.0, 0.25, 0.5, 0.9]),
       highest=st.booleans(), seed=st.integers(0, 3))
def test_compiled_prefill_and_answer_equal_the_reference(tokenizer, num_layers, data, ratio, highest, seed):
    layer = data.draw(st.integers(0, num_layers - 2))
    model = Showo2.random(small_config(num_layers=num_layers), seed=seed).attach(tokenizer=tokenizer)
    image = _image(model, seed)
    options = {"passes": ["token_drop"], "lowering": "eager", "strict": True, "token_drop_layer": layer,
               "token_drop_ratio": ratio, "token_drop_order": "highest" if highest else "lowest"}
    want_logits, want_tokens, want_cache, _ = reference_answer(model, tokenizer, image, QUESTION, 16,
                                                               drop=(layer, ratio, highest))

    torch._dynamo.reset()
    compiled = compile_tasks(model, "flashu", options)
    with torch.no_grad():
        rows, embeds = prepare(model, tokenizer, image, QUESTION)
        cache = DynamicCache(config=model.config.llm)
        logits = compiled.entries["prefill"](model, embeds, rows.attention_mask, cache, rows.image_positions())
        assert_close_rel(logits, want_logits)
        n_image = rows.image_positions().shape[1]
        kept = rows.seq_len - int(n_image * ratio)
        assert [lay.keys.shape[2] for lay in cache.layers] == \
            [rows.seq_len] * (layer + 1) + [kept] * (num_layers - 1 - layer)
        got_tokens = answer_tokens(model, tokenizer, image, QUESTION, max_new_tokens=16, entries=compiled.entries)
    assert got_tokens == want_tokens
    # Decoding appends to every layer: a new token's position is layer 0's length (every prompt token).
    n = len(want_tokens) - (len(want_tokens) == 16)  # no decode step after the last allowed token
    assert [lay.keys.shape[2] for lay in want_cache.layers] == \
        [rows.seq_len + n] * (layer + 1) + [kept + n] * (num_layers - 1 - layer)


def test_prompts_of_different_lengths_drop_on_the_symbolic_prefill_and_equal_the_reference(tokenizer):
    """A second prompt length makes dynamo trace the prefill with a symbolic sequence length; the pass
    rewrites that graph too (it used to fail on the symbol and fall back to the full prefill)."""
    model = Showo2.random(small_config(num_layers=3), seed=2).attach(tokenizer=tokenizer)
    image = _image(model, 2)
    layer, ratio = 0, 0.5
    options = {"passes": ["token_drop"], "lowering": "eager", "strict": True, "token_drop_layer": layer,
               "token_drop_ratio": ratio}
    questions = [QUESTION, "what is left of the red square?", "what colour is the triangle right of the green circle?"]
    wanted = [reference_answer(model, tokenizer, image, q, 8, drop=(layer, ratio, True)) for q in questions]
    sequences = []

    def record(name, when, gm, context, result):
        if name == "token_drop" and when == "after":
            sequences.append(result.stats.get("sequence"))

    torch._dynamo.reset()
    compiled = compile_tasks(model, "flashu", options)
    with torch.no_grad(), observe_passes(record):
        for question, (want_logits, want_tokens, _, _) in zip(questions, wanted, strict=True):
            rows, embeds = prepare(model, tokenizer, image, question)
            cache = DynamicCache(config=model.config.llm)
            logits = compiled.entries["prefill"](model, embeds, rows.attention_mask, cache, rows.image_positions())
            assert_close_rel(logits, want_logits)
            kept = rows.seq_len - int(rows.image_positions().shape[1] * ratio)
            assert [lay.keys.shape[2] for lay in cache.layers] == [rows.seq_len, kept, kept]
            assert answer_tokens(model, tokenizer, image, question, max_new_tokens=8,
                                 entries=compiled.entries) == want_tokens
    # One static prefill graph for the first length, one symbolic graph for every later length.
    assert len(sequences) == 2 and sequences[0].split()[0].isdigit(), sequences
    assert not sequences[1].split()[0].isdigit(), sequences


LAYER, RATIO = 0, 0.5
DROP = {"passes": ["token_drop"], "lowering": "eager", "token_drop_layer": LAYER, "token_drop_ratio": RATIO}
LONG_QUESTION = " ".join(["what colour is the circle left of the blue square"] * 8) + "?"


@pytest.fixture(scope="module")
def model(tokenizer):
    return Showo2.random(small_config(num_layers=3), seed=2).attach(tokenizer=tokenizer)


def _rows(model, tokenizer, question, seeds=(0,), size=None):
    """Prefill inputs (embeds, mask, image positions) of ``question`` about one image per seed, one row each;
    ``size``: the latent's (H, W), whose patches are the image tokens (default: the model's)."""
    c, (h, w) = model.config.image_latent_dim, size or model.config.latent_size
    rows = [prepare(model, tokenizer, torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(s)), question)
            for s in seeds]
    return (torch.cat([e for _, e in rows]), torch.cat([r.attention_mask for r, _ in rows]),
            torch.cat([r.image_positions() for r, _ in rows]))


def _full_flops(model, embeds, mask, length):
    """FLOPs of the eager prefill, without dropping, of the first ``length`` positions of every row."""
    with torch.no_grad(), FlopTally() as tally:
        call_counted(prefill, model, embeds[:, :length], mask[..., :length, :length],
                     DynamicCache(config=model.config.llm))
    return tally.total


def _assert_drops(model, fast, embeds, mask, positions):
    """``fast`` (a compiled prefill) drops int(RATIO * N) image tokens of every row after layer LAYER, without
    any pass warning: its logits and caches are the eager reference's, row by row, and its FLOPs those of the
    layers after LAYER on the survivors."""
    cache = DynamicCache(config=model.config.llm)
    with torch.no_grad(), FlopTally() as tally, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits = fast(model, embeds, mask, cache, positions)
    assert not [str(w.message) for w in caught if "flashu pass" in str(w.message)]
    for row in range(embeds.shape[0]):
        want_cache = DynamicCache(config=model.config.llm)
        want = reference_token_drop_prefill(model, embeds[row:row + 1], mask[row:row + 1], positions[row:row + 1],
                                            want_cache, LAYER, RATIO)
        assert_close_rel(logits[row:row + 1], want)
        for got_layer, want_layer in zip(cache.layers, want_cache.layers, strict=True):
            torch.testing.assert_close(got_layer.keys[row:row + 1], want_layer.keys)
    depth, seq = len(cache.layers), embeds.shape[1]
    kept = seq - int(positions.shape[1] * RATIO)
    assert [lay.keys.shape[2] for lay in cache.layers] == [seq] * (LAYER + 1) + [kept] * (depth - 1 - LAYER)
    # Only matmuls and attention count, per layer, and the head reads the last position either way: layers up
    # to LAYER cost what they cost on every token, the later ones what they cost on the survivors.
    assert depth * tally.total == ((LAYER + 1) * _full_flops(model, embeds, mask, seq)
                                   + (depth - 1 - LAYER) * _full_flops(model, embeds, mask, kept))


def _sequences():
    """Record the ``sequence`` stat of every graph token_drop rewrites (a list of "S -> S'")."""
    seen = []

    def record(name, when, gm, context, result):
        if name == "token_drop" and when == "after":
            seen.append(result.stats.get("sequence"))
    return seen, observe_passes(record)


def test_static_length_drops(model, tokenizer):
    torch._dynamo.reset()
    fast = torch.compile(prefill, backend="flashu", options=DROP)
    seen, observing = _sequences()
    with observing:
        _assert_drops(model, fast, *_rows(model, tokenizer, QUESTION))
    assert len(seen) == 1 and seen[0].split()[0].isdigit(), seen


def test_symbolic_length_drops_for_every_later_question(model, tokenizer):
    """A second question length makes dynamo trace a symbolic sequence length; the third reuses that graph."""
    torch._dynamo.reset()
    fast = torch.compile(prefill, backend="flashu", options=DROP)
    seen, observing = _sequences()
    with observing:
        for question in (QUESTION, "what is left of the red square?", "what colour is the triangle right of two?"):
            _assert_drops(model, fast, *_rows(model, tokenizer, question))
    assert len(seen) == 2 and seen[0].split()[0].isdigit() and not seen[1].split()[0].isdigit(), seen


def test_dynamic_graph_drops_for_every_question_and_image_size(model, tokenizer):
    """dynamic=True: the sequence length and the image's token count N are symbolic, and so is int(rho * N).
    One graph serves every call: the pass adds no guard that would specialize it to the first N."""
    torch._dynamo.reset()
    fast = torch.compile(prefill, backend="flashu", options=DROP, dynamic=True)
    seen, observing = _sequences()
    with observing:
        for question, size in ((QUESTION, None), ("what is left of the red square?", (6, 8)),
                               ("what colour is the triangle right of two?", (4, 6))):
            _assert_drops(model, fast, *_rows(model, tokenizer, question, size=size))
    assert len(seen) == 1 and "int(0.5 * " in seen[0], seen


@pytest.mark.parametrize("seeds", [(0, 1), (0, 1, 2)], ids=["batch 2", "batch 3"])
def test_a_batch_drops_each_rows_own_tokens(model, tokenizer, seeds):
    """Rows of different images drop different positions; each row equals its own single-row reference."""
    torch._dynamo.reset()
    fast = torch.compile(prefill, backend="flashu", options=DROP)
    _assert_drops(model, fast, *_rows(model, tokenizer, QUESTION, seeds))


def test_a_batch_of_symbolic_size_drops(model, tokenizer):
    """A second batch size makes dynamo trace a symbolic batch; that graph drops too."""
    torch._dynamo.reset()
    fast = torch.compile(prefill, backend="flashu", options=DROP)
    seen, observing = _sequences()
    with observing:
        for seeds in ((0, 1), (0, 1, 2), (3, 4, 5, 6)):
            _assert_drops(model, fast, *_rows(model, tokenizer, QUESTION, seeds))
    assert len(seen) == 2, seen  # batch 2's graph, then one with a symbolic batch for 3 and 4


@pytest.mark.parametrize("question", ["what?", LONG_QUESTION], ids=["short", "long"])
def test_short_and_long_questions_drop(model, tokenizer, question):
    torch._dynamo.reset()
    fast = torch.compile(prefill, backend="flashu", options=DROP)
    _assert_drops(model, fast, *_rows(model, tokenizer, question))


def test_dropping_changes_the_prefill_it_is_not_a_no_op(small_model, tokenizer):
    image = _image(small_model, 0)
    rows, embeds = prepare(small_model, tokenizer, image, QUESTION)
    torch._dynamo.reset()
    fast = torch.compile(prefill, backend="flashu", options={"passes": ["token_drop"], "lowering": "eager",
                                                             "token_drop_layer": 0})
    with torch.no_grad():
        dropped = fast(small_model, embeds, rows.attention_mask, DynamicCache(config=small_model.config.llm),
                       rows.image_positions())
        full = prefill(small_model, embeds, rows.attention_mask, DynamicCache(config=small_model.config.llm),
                       rows.image_positions())
    assert float((dropped - full).abs().max()) > 1e-4


def test_decoder_flops_fall_by_a_third_with_729_image_tokens(tokenizer):
    """Show-o2's depth (28 layers, K = 2) and image size (27 x 27 tokens) at a toy width."""
    model = Showo2.random(small_config(num_layers=28, grid=27, patch_size=1, latent_channels=12), seed=0)
    model.attach(tokenizer=tokenizer)
    image = _image(model, 0)
    rows, embeds = prepare(model, tokenizer, image, QUESTION)
    assert rows.image_positions().shape[1] == 729
    flops = {}
    for name, passes in (("full", []), ("dropped", ["token_drop"])):
        torch._dynamo.reset()
        fast = torch.compile(prefill, backend="flashu", options={"passes": passes, "lowering": "eager"})
        with torch.no_grad(), FlopTally() as tally:
            fast(model, embeds, rows.attention_mask, DynamicCache(config=model.config.llm), rows.image_positions())
        flops[name] = tally.total
    print(f"prefill FLOPs: {flops['full'] / 1e6:.1f} M -> {flops['dropped'] / 1e6:.1f} M")
    assert flops["dropped"] <= 0.65 * flops["full"], flops


def test_bad_settings_are_clear_errors(small_model, tokenizer):
    rows, embeds = prepare(small_model, tokenizer, _image(small_model, 0), QUESTION)
    torch._dynamo.reset()
    depth = small_model.config.llm.num_hidden_layers
    too_deep = rf"'token_drop_layer' is {depth - 1}.*after layers 0\.\.{depth - 2}"
    for strict in (False, True):
        torch._dynamo.reset()
        fast = torch.compile(prefill, backend="flashu", options={"passes": ["token_drop"], "lowering": "eager",
                                                                 "token_drop_layer": depth - 1, "strict": strict})
        # A K the model is too shallow for: the pass is reported and left out (strict: an error).
        with pytest.raises(Exception, match=too_deep) if strict else pytest.warns(UserWarning, match=too_deep):
            fast(small_model, embeds, rows.attention_mask, DynamicCache(config=small_model.config.llm),
                 rows.image_positions())
    with pytest.raises(Exception, match=r"token_drop_ratio.*\[0, 1\)"):
        torch.compile(prefill, backend="flashu", options={"token_drop_ratio": 1.0})(
            small_model, embeds, rows.attention_mask, DynamicCache(config=small_model.config.llm))


def test_image_free_prompt_is_left_alone(small_model, tokenizer):
    """No marked image tokens (a text-only prefill): the pass says it does not act, logits as eager (strict: error)."""
    rows, embeds = prepare(small_model, tokenizer, _image(small_model, 0), QUESTION)
    for strict in (False, True):
        torch._dynamo.reset()
        fast = torch.compile(prefill, backend="flashu", options={"passes": ["token_drop"], "lowering": "eager",
                                                                 "strict": strict})
        with torch.no_grad(), (pytest.raises(Exception, match="no marked image tokens") if strict
                               else pytest.warns(UserWarning, match="no marked image tokens")):
            got = fast(small_model, embeds, rows.attention_mask, DynamicCache(config=small_model.config.llm))
            want = prefill(small_model, embeds, rows.attention_mask, DynamicCache(config=small_model.config.llm))
            assert torch.equal(got, want)
