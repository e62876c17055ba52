"""The Show-o2 call graph-diff compiles by default: a denoising step or an understanding prefill."""

from __future__ import annotations

from collections.abc import Callable

import torch


def sample_call(model, task: str, prompt: str, question: str, seed: int) -> tuple[Callable, tuple]:
    """The entry point graph-diff compiles for ``task`` and one example input for it."""
    from transformers import DynamicCache

    from ...models.showo2 import understanding
    from ...models.showo2.sequences import t2i_rows

    cfg = model.config
    generator = torch.Generator().manual_seed(seed)
    if task == "t2i":
        rows = t2i_rows(model.tokenizer, [prompt], cfg.num_image_tokens, cfg.max_text_len, guidance=True)
        latents = torch.randn(2, cfg.image_latent_dim, *cfg.latent_size, generator=generator)
        return model.denoise, (rows.text_tokens, latents, torch.full((2,), 0.4), rows.attention_mask,
                               rows.modality_positions)
    image = torch.randn(1, cfg.image_latent_dim, *cfg.latent_size, generator=generator)
    rows, embeds = understanding.prepare(model, model.tokenizer, image, question)

    def prefill(embeds: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # A new cache per call: graph-diff calls the function more than once with the same inputs.
        return understanding.prefill(model, embeds, attention_mask, DynamicCache(config=cfg.llm), positions)

    return prefill, (embeds, rows.attention_mask, rows.image_positions())
