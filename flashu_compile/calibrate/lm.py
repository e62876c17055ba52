"""Wanda calibration of any decoder the structure index accepts: :func:`calibrate_lm`.

A transformers ``Qwen2ForCausalLM`` / ``LlamaForCausalLM``, or a vision-language model whose
language model is such a decoder, is run on the caller's text (or image + text) batches; the
``down_proj`` input norms give each FFN neuron's Wanda score, exactly as :func:`calibrate` does
for Show-o2, and the result is the same :class:`Plan`.

Which task the plan's keep sets are filed under: the ``flashu`` backend infers task ``"mmu"``
for every graph without flow-head blocks (any plain LLM or VLM forward), and ``prune_channels``
reads ``plan.keep[task]`` for the graph's task. So the plan holds ``"mmu"`` by default; a graph
compiled with ``options={"task": "t2i"}`` needs a plan calibrated with ``task="t2i"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..validate import check_float, check_int
from .plan import Plan, decoder_layers
from .scores import TASKS, DownProjInputs, plan_from_records


def _text_kind(texts: Any) -> tuple[str, list]:
    """``("str", [...])`` or ``("ids", [...])`` for the accepted forms of ``texts``; ValueError otherwise.

    ``ids`` items are int64 tensors: a 2-D tensor is one batch of equal-length rows (every token counts),
    a 1-D tensor one sequence (padded into batches later).
    """
    if isinstance(texts, (str, torch.Tensor)):
        texts = [texts]
    if not isinstance(texts, Sequence):
        raise ValueError(f"texts must be strings or token-id tensors, got {type(texts).__name__}")
    if not len(texts):
        raise ValueError("texts is empty: give at least one string or token-id tensor")
    if all(isinstance(t, str) for t in texts):
        if not all(t for t in texts):
            raise ValueError("texts holds an empty string")
        return "str", list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"texts[{i}] must be a string or a token-id tensor (all of one kind), got "
                             f"{type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"texts[{i}] must hold integer token ids, got {t.dtype}")
        if t.dim() not in (1, 2) or t.numel() == 0:
            raise ValueError(f"texts[{i}] must be a non-empty 1-D sequence or 2-D batch of token ids, got shape "
                             f"{tuple(t.shape)}")
    return "ids", [t.long() for t in texts]


def _pad_right(rows: list[torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch from 1-D sequences: padded on the right, so every real token keeps its position and
    (under causal attention) its value; the attention mask marks the real tokens."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _text_batches(kind: str, texts: list, images: list | None, tokenizer: Callable | None, batch_size: int,
                  pad_id: int) -> Iterator[dict[str, Any]]:
    if images is not None:
        for i in range(0, len(texts), batch_size):
            yield dict(tokenizer(text=texts[i:i + batch_size], images=images[i:i + batch_size],
                                 return_tensors="pt", padding=True))
        return
    if kind == "str":
        rows = [torch.as_tensor(ids, dtype=torch.long) for ids in tokenizer(text=texts)["input_ids"]]
        if any(not len(r) for r in rows):
            raise ValueError("the tokenizer gave an empty token sequence for one of texts")
    else:
        rows = []
        for t in texts:
            if t.dim() == 2:
                yield {"input_ids": t}
            else:
                rows.append(t)
    for i in range(0, len(rows), batch_size):
        yield _pad_right(rows[i:i + batch_size], pad_id)


def _check_inputs(inputs: Any) -> list[Mapping]:
    if isinstance(inputs, (Mapping, str, torch.Tensor)) or not isinstance(inputs, Iterable):
        raise ValueError(f"inputs must be an iterable of dicts of model inputs (one dict a batch), got "
                         f"{type(inputs).__name__}")
    batches = list(inputs)
    if not batches:
        raise ValueError("inputs is empty: give at least one dict of model inputs")
    for i, batch in enumerate(batches):
        if not isinstance(batch, Mapping) or not batch:
            raise ValueError(f"inputs[{i}] must be a non-empty dict of model inputs, got {type(batch).__name__}")
        bad = [key for key in batch if not isinstance(key, str)]
        if bad:
            raise ValueError(f"inputs[{i}] keys must be argument names, got {bad}")
    return batches


def _check_token_ids(model: nn.Module, batches: list[Mapping]) -> None:
    """Token ids outside the embedding table would fail deep inside the model (or index out of bounds on a GPU)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    for k, batch in enumerate(batches):
        ids = batch.get("input_ids")
        if vocab is None or not isinstance(ids, torch.Tensor) or not ids.numel():
            continue
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab:
            raise ValueError(f"calibration batch {k} holds token id {low if low < 0 else high}, outside the "
                             f"model's vocabulary [0, {vocab})")


@torch.no_grad()
def calibrate_lm(
    model: nn.Module,
    texts: Sequence[str] | Sequence[torch.Tensor] | torch.Tensor | str | None = None,
    *,
    images: Sequence | None = None,
    tokenizer: Callable | None = None,
    inputs: Iterable[Mapping[str, Any]] | None = None,
    prune_ratio: float = 0.2,
    prune_multiple: int = 64,
    batch_size: int = 8,
    task: str = "mmu",
    progress: bool = False,
) -> Plan:
    """Calibrate FFN keep sets for every decoder layer of a causal LM (or a VLM's LLM) from text batches.

    Calibration data, at least one of:

    - ``texts``: strings (tokenized with ``tokenizer(text=[...])["input_ids"]``), 1-D token-id tensors
      (one sequence each) or 2-D token-id tensors (one batch each). Sequences are grouped
      ``batch_size`` at a time and padded on the right; padding is left out of the scores.
    - ``images`` with string ``texts`` (one image per text): batches from
      ``tokenizer(text=..., images=..., return_tensors="pt", padding=True)``, so ``tokenizer`` is the
      model's multimodal processor.
    - ``inputs``: ready model inputs, one dict of keyword arguments per batch (e.g. processor outputs).

    Each batch runs ``model(**batch, use_cache=False)`` (unless the batch sets ``use_cache``); a batch's
    ``attention_mask`` selects the tokens that count, and must then have the shape (batch, tokens) of
    the LLM's sequence. Each layer keeps ``I - floor(I * prune_ratio)`` neurons rounded down to a
    multiple of ``prune_multiple`` (see :func:`keep_count`), its top Wanda scores, sorted by index.

    The plan holds one task, ``task``: ``"mmu"``, the task the ``flashu`` backend infers for a graph
    without flow-head blocks (any LLM forward), so it applies as
    ``options={"plan": plan, "passes": ["prune_channels"]}``. Calibrate before compiling with a plan:
    ``prune_channels`` reorders FFN neurons in place, and a plan's indices refer to the order it saw.
    """
    check_float("prune_ratio", prune_ratio, 0.0, 1.0, high_open=True)
    prune_multiple = check_int("prune_multiple", prune_multiple, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if hasattr(model.forward, "_torchdynamo_orig_callable") or hasattr(model, "_orig_mod"):
        # Compiled, the forward hides its FFN inputs from the hooks (and a flashu program may have pruned them).
        raise ValueError("model is already compiled (torch.compile): calibrate the uncompiled model, then compile it "
                         "with options={'plan': plan, ...}")
    if texts is None and inputs is None:
        raise ValueError("no calibration data: give texts (strings or token ids) or inputs (dicts of model inputs)")
    kind, text_list = _text_kind(texts) if texts is not None else ("ids", [])
    if images is not None:
        if kind != "str":
            raise ValueError("images go with string texts (one image per text), given to a processor as tokenizer=")
        if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
            raise ValueError(f"images must be a sequence (one image per text), got {type(images).__name__}")
        if len(images) != len(text_list):
            raise ValueError(f"{len(images)} images for {len(text_list)} texts: give one image per text")
    if (kind == "str" or images is not None) and not callable(tokenizer):
        raise ValueError("string texts need tokenizer= (a transformers tokenizer, or a processor with images)")
    extra = _check_inputs(inputs) if inputs is not None else []
    named = decoder_layers(model)  # raises ValueError when the model has no decoder stack the index accepts
    config = getattr(model, "config", None)
    pad_id = getattr(config, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)  # padded positions are masked out; any valid id will do

    device = next(model.parameters()).device
    batches = list(_text_batches(kind, text_list, images, tokenizer, batch_size, pad_id)) + extra
    _check_token_ids(model, batches)
    layers = [layer for _, layer in named]
    was_training = model.training
    model.eval()
    try:
        with DownProjInputs(layers) as rec:
            for batch in tqdm(batches, desc="calibrating", disable=not progress):
                kwargs = {key: value.to(device) if isinstance(value, torch.Tensor) else value
                          for key, value in batch.items()}
                kwargs.setdefault("use_cache", False)
                rec.token_mask = kwargs.get("attention_mask")
                model(**kwargs)
    finally:
        model.train(was_training)
    if rec.tokens[0] == 0:
        raise ValueError("the calibration batches hold no tokens (every attention_mask entry is 0)")
    dtype = next(model.parameters()).dtype
    settings = {
        "source": "calibrate_lm",
        "tasks": [task],
        "prune_ratio": float(prune_ratio),
        "multiple": prune_multiple,
        "batch_size": batch_size,
        "batches": len(batches),
        "tokens": {task: rec.tokens[0]},
        "images": images is not None,
        "dtype": str(dtype).removeprefix("torch."),
    }
    return plan_from_records(model, named, {task: rec}, prune_ratio, prune_multiple, settings)
