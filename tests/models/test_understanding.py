import inspect
import warnings

import pytest
import torch
from transformers import DynamicCache

from flashu_compile.models.showo2.understanding import CACHE_ARGUMENT, answer_tokens, decode_step, prefill, prepare


@pytest.fixture(scope="module")
def latents(small_model):
    cfg = small_model.config
    return torch.randn(1, cfg.image_latent_dim, *cfg.latent_size, generator=torch.Generator().manual_seed(7))


def test_cached_decoding_equals_full_recompute(small_model, tokenizer, latents):
    # A never-emitted eos forces the full max_new_tokens on both paths.
    cached = answer_tokens(small_model, tokenizer, latents, "what colour is the circle?", max_new_tokens=12)
    recomputed = answer_tokens(small_model, tokenizer, latents, "what colour is the circle?", max_new_tokens=12,
                               use_cache=False)
    assert cached == recomputed
    assert len(cached) >= 1


def test_cached_logits_match_recompute_at_every_step(small_model, tokenizer, latents):
    from flashu_compile.models.showo2.sequences import omni_attention_mask

    rows, embeds = prepare(small_model, tokenizer, latents, "what shape is the red object?")
    cache = DynamicCache(config=small_model.config.llm)
    with torch.no_grad():
        logits = prefill(small_model, embeds, rows.attention_mask, cache)
        for step in range(4):
            full = small_model.showo.lm_head(small_model.llm_hidden(
                embeds, omni_attention_mask(rows.modality_positions, embeds.shape[1])))[:, -1]
            torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
            token = torch.tensor([5 + step])
            embeds = torch.cat([embeds, small_model.showo.model.embed_tokens(token.view(1, 1))], dim=1)
            logits = decode_step(small_model, token, cache)


def test_answer_stops_at_eos(small_model, tokenizer, latents):
    real_head = small_model.showo.lm_head

    class EosAfterTwo(torch.nn.Module):
        calls = 0

        def forward(self, hidden):
            out = real_head(hidden)
            EosAfterTwo.calls += 1
            if EosAfterTwo.calls == 3:
                out = torch.zeros_like(out)
                out[..., tokenizer.eos_id] = 1.0
            return out

    small_model.showo.lm_head = EosAfterTwo()
    try:
        ids = answer_tokens(small_model, tokenizer, latents, "what colour is the circle?", max_new_tokens=10)
    finally:
        small_model.showo.lm_head = real_head
    assert len(ids) == 2 and tokenizer.eos_id not in ids


def test_answer_text_and_bad_inputs(small_model, latents):
    image = torch.rand(3, 20, 20)  # resized to the model's 16x16 input
    text = small_model.answer(image, "what colour is the circle?", max_new_tokens=3)
    assert isinstance(text, str)
    with pytest.raises(ValueError, match="one image latent"):
        answer_tokens(small_model, small_model.tokenizer, latents.repeat(2, 1, 1, 1), "what?")
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        answer_tokens(small_model, small_model.tokenizer, latents, "what?", max_new_tokens=0)


def test_cache_is_passed_under_the_llm_s_current_argument_name(small_model, tokenizer, latents):
    assert CACHE_ARGUMENT in inspect.signature(type(small_model.showo.model).forward).parameters
    rows, embeds = prepare(small_model, tokenizer, latents, "what colour is the circle?")
    cache = DynamicCache(config=small_model.config.llm)
    with torch.no_grad(), warnings.catch_warnings():
        # transformers deprecates the old spelling (past_key_values) with a FutureWarning naming it.
        warnings.filterwarnings("error", message=".*past_key_values")
        prefill(small_model, embeds, rows.attention_mask, cache)
        decode_step(small_model, torch.tensor([5]), cache)
    assert cache.get_seq_length() == embeds.shape[1] + 1  # both calls wrote into the cache they were given
