"""One denoising forward and one prefill must trace into a single graph each."""

import torch
from transformers import DynamicCache

from flashu_compile.models.showo2.sequences import t2i_rows
from flashu_compile.models.showo2.understanding import prefill, prepare


def t2i_inputs(model, tokenizer):
    cfg = model.config
    rows = t2i_rows(tokenizer, ["red circle above blue square"], cfg.num_image_tokens, cfg.max_text_len,
                    guidance=True)
    lat = torch.randn(2, cfg.image_latent_dim, *cfg.latent_size)
    return rows.text_tokens, lat, torch.full((2,), 0.4), rows.attention_mask, rows.modality_positions


def test_t2i_forward_has_no_graph_breaks(small_model, tokenizer):
    torch._dynamo.reset()
    with torch.no_grad():
        report = torch._dynamo.explain(small_model)(*t2i_inputs(small_model, tokenizer))
    assert report.graph_break_count == 0, report.break_reasons
    assert report.graph_count == 1


def test_denoise_compiles_fullgraph_and_matches_eager(small_model, tokenizer):
    torch._dynamo.reset()
    inputs = t2i_inputs(small_model, tokenizer)
    compiled = torch.compile(small_model.denoise, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs), small_model.denoise(*inputs), rtol=1e-6, atol=1e-6)


def test_prefill_has_no_graph_breaks(small_model, tokenizer):
    torch._dynamo.reset()
    lat = torch.randn(1, small_model.config.image_latent_dim, *small_model.config.latent_size)
    rows, _ = prepare(small_model, tokenizer, lat, "what colour is the circle?")

    def run(tokens, latents, time_positions, mask):
        # Image features, time token placement and the cached LLM pass, all in one trace.
        embeds, _ = small_model.embed(tokens, latents, torch.ones(1), time_positions)
        return prefill(small_model, embeds, mask, DynamicCache(config=small_model.config.llm))

    with torch.no_grad():
        report = torch._dynamo.explain(run)(rows.text_tokens, lat, rows.time_positions, rows.attention_mask)
    assert report.graph_break_count == 0, report.break_reasons
