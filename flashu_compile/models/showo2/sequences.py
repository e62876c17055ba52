"""Token rows, modality positions and the omni-attention mask, laid out as the official code does.

A text-to-image row is ``[bos] prompt [boi] [time] [image]*N [eoi] [eos] [pad]...`` with
``modality_positions = (offset of the time token, N + 1)``. The understanding row is
``[bos] system user-prefix [boi] [time] [image]*N [eoi] question assistant-prefix``; there the
official code records the span one position later (offset = time position + 1), which shifts
its bidirectional block by one token. That quirk is reproduced because released checkpoints
are evaluated with it.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass, fields

import torch

from ...validate import check_int, warn_user
from .tokenizer import ASSISTANT_PREFIX, SYSTEM_PROMPT, USER_PREFIX, Showo2Tokenizer

# The official inverted mask is filled with iinfo(int64).min and cast to the model dtype.
MASK_VALUE = float(torch.iinfo(torch.long).min)


def span_membership(modality_positions: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B, M, L) bool: whether each position lies in each (offset, length) span of its row."""
    pos = torch.arange(seq_len, device=modality_positions.device)
    offset = modality_positions[..., 0:1]
    return (pos >= offset) & (pos < offset + modality_positions[..., 1:2])


def omni_attention_mask(
    modality_positions: torch.Tensor, seq_len: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """4D additive mask (B, 1, L, L): causal, plus full attention inside each modality span.

    ``modality_positions`` is (B, M, 2) of (offset, length); length 0 marks an empty slot.
    """
    if modality_positions.dim() != 3 or modality_positions.shape[-1] != 2:
        raise ValueError(f"modality_positions must be (batch, images, 2), got {tuple(modality_positions.shape)}")
    inside = span_membership(modality_positions, seq_len)
    same_span = (inside[..., :, None] & inside[..., None, :]).any(dim=1)  # (B, L, L)
    device = modality_positions.device
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    allowed = causal | same_span
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, MASK_VALUE)[:, None]


@dataclass
class Rows:
    """Model inputs for a batch of rows (what the official forward takes)."""

    text_tokens: torch.Tensor  # (B, L) long
    modality_positions: torch.Tensor  # (B, 1, 2) long
    attention_mask: torch.Tensor  # (B, 1, L, L) additive
    time_positions: torch.Tensor  # (B,) long: where the time token sits

    @property
    def seq_len(self) -> int:
        return self.text_tokens.shape[1]

    def image_positions(self) -> torch.Tensor:
        """(B, N) long: where each row's image tokens sit (right after its time token)."""
        n = int(self.modality_positions[0, 0, 1]) - 1  # every row's span is the time token + N image tokens
        return self.time_positions[:, None] + 1 + torch.arange(n, device=self.time_positions.device)

    def to(self, device: torch.device | str) -> Rows:
        """The same rows on ``device`` (rows are built on the CPU; the model may live elsewhere)."""
        return Rows(*(getattr(self, f.name).to(device) for f in fields(self)))


def t2i_rows(
    tokenizer: Showo2Tokenizer,
    prompts: list[str],
    num_image_tokens: int,
    max_text_len: int,
    guidance: bool,
    dtype: torch.dtype = torch.float32,
) -> Rows:
    """Text-to-image rows; with ``guidance`` the unconditional rows follow the conditional ones.

    Every row is ``max_text_len + num_image_tokens + 5`` tokens long (bos, the text budget, boi, the time and
    image tokens, eoi, eos): a prompt longer than ``max_text_len`` tokens is cut, with a warning, and a shorter
    one padded. :func:`check_t2i_fits` tells whether such a row fits the model's positions.
    """
    if not prompts:
        raise ValueError("at least one prompt is needed")
    max_text_len = check_int("max_text_len", max_text_len, 1)
    span = num_image_tokens + 1  # the time token leads the image span

    def row(ids: list[int]) -> tuple[list[int], int]:
        tokens = ([tokenizer.bos_id, *ids, tokenizer.boi_id] + [tokenizer.img_pad_id] * span
                  + [tokenizer.eoi_id, tokenizer.eos_id] + [tokenizer.pad_id] * (max_text_len - len(ids)))
        return tokens, len(ids) + 2

    rows = [row(_fit(tokenizer.encode(p), max_text_len, p)) for p in prompts]
    if guidance:
        rows += [row([]) for _ in prompts]
    tokens = torch.tensor([r[0] for r in rows], dtype=torch.long)
    offsets = torch.tensor([r[1] for r in rows], dtype=torch.long)
    positions = torch.stack([offsets, torch.full_like(offsets, span)], dim=-1)[:, None]
    return Rows(tokens, positions, omni_attention_mask(positions, tokens.shape[1], dtype), offsets)


def check_t2i_fits(num_image_tokens: int, max_text_len: int, max_positions: int) -> None:
    """A ValueError naming the limit when a text-to-image row (see :func:`t2i_rows`) is longer than
    ``max_positions`` (the LLM's ``max_position_embeddings``): past it the model sees positions it does not know."""
    length = max_text_len + num_image_tokens + 5
    if length > max_positions:
        raise ValueError(f"a text-to-image row needs {length} positions (a text budget of {max_text_len} tokens, "
                         f"{num_image_tokens + 1} time and image tokens, 4 special tokens) but the model has "
                         f"{max_positions} (max_position_embeddings)")


def _fit(ids: list[int], max_text_len: int, prompt: str) -> list[int]:
    """The prompt's ids within the row's text budget; what does not fit is cut, with a warning."""
    if len(ids) > max_text_len:
        warn_user(f"prompt {reprlib.repr(prompt)} has {len(ids)} tokens but the text budget is {max_text_len}: "
                  f"its last {len(ids) - max_text_len} token(s) are cut")
    return ids[:max_text_len]


def mmu_row(
    tokenizer: Showo2Tokenizer, question: str, num_image_tokens: int, dtype: torch.dtype = torch.float32,
    max_positions: int | None = None, max_new_tokens: int = 0,
) -> Rows:
    """The understanding row for one image and one question (official chat layout).

    With ``max_positions`` (the LLM's ``max_position_embeddings``) the row and ``max_new_tokens`` answer
    tokens must fit in it, each answer token counted as a position; a question too long for that is a
    ValueError naming how many tokens fit. Past the limit the model sees positions it does not know and
    answers nonsense, so the question is refused rather than cut or answered.
    """
    head = [tokenizer.bos_id, *tokenizer.encode(SYSTEM_PROMPT), *tokenizer.encode(USER_PREFIX)]
    span = num_image_tokens + 1
    asked = tokenizer.encode(question)
    tail = [tokenizer.eoi_id, *asked, *tokenizer.encode(ASSISTANT_PREFIX)]
    tokens = head + [tokenizer.boi_id] + [tokenizer.img_pad_id] * span + tail
    if max_positions is not None and len(tokens) + max_new_tokens > max_positions:
        fixed = len(tokens) - len(asked)
        fit = max(max_positions - fixed - max_new_tokens, 0)
        raise ValueError(f"question has {len(asked)} tokens but at most {fit} fit: the model has {max_positions} "
                         f"positions (max_position_embeddings), the chat template and the image take {fixed} and "
                         f"the answer (max_new_tokens) {max_new_tokens}; shorten the question or lower max_new_tokens")
    time_position = len(head) + 1
    # Official inference_mmu: offset = len(head) + 2, one past the time token (see module doc).
    positions = torch.tensor([[[time_position + 1, span]]], dtype=torch.long)
    return Rows(torch.tensor([tokens], dtype=torch.long), positions, omni_attention_mask(positions, len(tokens), dtype),
                torch.tensor([time_position], dtype=torch.long))
