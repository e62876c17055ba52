"""Multimodal understanding: prefill the image + question row into a KV cache, then decode greedily.

The official demo recomputes the whole sequence for every new token; with the omni mask a new
token sees every earlier position, so prefill + cached decoding gives the same tokens at a
fraction of the cost. :func:`answer_tokens` with ``use_cache=False`` keeps the official loop
for comparison.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

import torch
from transformers import DynamicCache, Qwen2Model

from ...runtime.markers import mark_visual
from .sequences import Rows, mmu_row, omni_attention_mask

# The LLM's name for its KV cache argument: ``cache`` since transformers 5.24 (``past_key_values`` is
# deprecated for removal in 5.40), ``past_key_values`` before. Read once here, not in the traced calls.
CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(Qwen2Model.forward).parameters else "past_key_values"


def prepare(model, tokenizer, image_latents: torch.Tensor, question: str, embed: Callable | None = None,
            max_new_tokens: int = 0) -> tuple[Rows, torch.Tensor]:
    """The understanding row and its input embeddings (time token at t = 1, "clean" image), through ``embed``
    (a compiled ``model.embed``; default: the model's own).

    The row and ``max_new_tokens`` answer tokens must fit the LLM's ``max_position_embeddings``: a question
    too long for that is a ValueError naming the limit (see :func:`sequences.mmu_row`)."""
    if image_latents.dim() != 4 or image_latents.shape[0] != 1:
        raise ValueError(f"one image latent (1, c, H, W) is expected, got {tuple(image_latents.shape)}")
    p = model.config.patch_size
    n = (image_latents.shape[-2] // p) * (image_latents.shape[-1] // p)
    rows = mmu_row(tokenizer, question, n, dtype=model.dtype, max_positions=model.config.llm.max_position_embeddings,
                   max_new_tokens=max_new_tokens).to(model.device)
    t = torch.ones(1, device=model.device)
    embeds, _ = (embed or model.embed)(rows.text_tokens, image_latents.to(model.device), t, rows.time_positions)
    return rows, embeds


def prefill(
    model, embeds: torch.Tensor, attention_mask: torch.Tensor, cache: DynamicCache,
    image_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the prompt through the LLM, filling ``cache``; returns the last position's logits.

    ``image_positions`` (B, N) marks the image tokens in the traced graph, for passes that treat
    them differently (``token_drop``); it does not change the result.
    """
    if image_positions is not None:
        embeds = mark_visual(embeds, image_positions)
    hidden = model.llm_hidden(embeds, attention_mask, use_cache=True, **{CACHE_ARGUMENT: cache})
    return model.showo.lm_head(hidden[:, -1:])[:, -1]


def decode_step(model, token: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """One cached step: the new token sees every cached position of every layer, so no layer gets a mask.

    The layers' caches need not be equally long (a layer skipped by ``layer_skip`` appends nothing).
    Asked for a mask, transformers sizes one for all layers from the first layer's cache; it skips
    that only in eager runs and, since torch 2.13, under ``torch.compile`` (transformers 5.17 under
    any compile, and any release on torch 2.11, build it while tracing, where it then fails to
    broadcast against a shorter cache). So the step passes transformers' per-layer-type mask
    mapping with no mask for any type, which every release takes as given.
    """
    embeds = model.showo.model.embed_tokens(token.view(1, 1))
    no_mask = dict.fromkeys(model.config.llm.layer_types)
    hidden = model.llm_hidden(embeds, no_mask, use_cache=True, **{CACHE_ARGUMENT: cache})
    return model.showo.lm_head(hidden)[:, -1]


@torch.no_grad()
def answer_tokens(
    model, tokenizer, image_latents: torch.Tensor, question: str, max_new_tokens: int = 300, use_cache: bool = True,
    entries: Mapping[str, Callable] | None = None,
) -> list[int]:
    """Greedy answer token ids, stopping at eos (not included) or ``max_new_tokens``; a question for which the
    image, the chat template and ``max_new_tokens`` answer tokens do not fit the LLM's positions is a ValueError.

    ``entries`` replaces :func:`prefill`, :func:`decode_step` and ``model.embed`` by name (``"prefill"``,
    ``"decode"``, ``"embed"``: compiled ones, as ``flashu_compile.compile_tasks`` gives them); a name it lacks
    runs eagerly. The compiled programs tell an answer's calls apart by themselves: a prefill begins a
    request, each decode step (which continues a KV cache) is its next call.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    entries = entries or {}
    rows, embeds = prepare(model, tokenizer, image_latents, question, entries.get("embed"), max_new_tokens)
    prefill_fn = entries.get("prefill", prefill)
    decode_fn = entries.get("decode", decode_step)
    out: list[int] = []
    if use_cache:
        cache = DynamicCache(config=model.config.llm)
        logits = prefill_fn(model, embeds, rows.attention_mask, cache, rows.image_positions())
    else:
        logits = model.showo.lm_head(model.llm_hidden(embeds, rows.attention_mask))[:, -1]
    for _ in range(max_new_tokens):
        token = logits.argmax(dim=-1)
        if int(token) == tokenizer.eos_id:
            break
        out.append(int(token))
        if len(out) == max_new_tokens:
            break
        if use_cache:
            logits = decode_fn(model, token, cache)
        else:
            embeds = torch.cat([embeds, model.showo.model.embed_tokens(token.view(1, 1))], dim=1)
            mask = omni_attention_mask(rows.modality_positions, embeds.shape[1], dtype=embeds.dtype)
            logits = model.showo.lm_head(model.llm_hidden(embeds, mask))[:, -1]
    return out
