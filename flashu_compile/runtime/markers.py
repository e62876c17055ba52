"""Marker ops: facts the model code knows and a graph pass needs, carried into the traced graph.

Which positions of an understanding prompt hold image tokens is known where the prompt is
built, not in the LLM graph. ``mark_visual(embeds, positions)`` puts those positions into the
graph as an explicit op, so ``token_drop`` finds them without guessing from names or shapes.
Without the pass the op is a copy of the embeddings (negligible next to a prefill); the pass
replaces it by its input.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("flashu::mark_visual", mutates_args=())
def mark_visual(embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``embeds`` (B, S, H) unchanged; ``positions`` (B, N) long are the image tokens' sequence positions."""
    # A custom op may not return an alias of its input, hence the copy.
    return embeds.clone()


@mark_visual.register_fake
def _(embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(embeds)


MARK_VISUAL = torch.ops.flashu.mark_visual.default
