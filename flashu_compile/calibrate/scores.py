"""Wanda structured scores of the LLM's FFN neurons, per task, and :func:`calibrate`.

Score of neuron ``j`` of a SwiGLU ``down_proj(silu(gate(x)) * up(x))``:
``||X_j||_2 * sum_i |W_down[i, j]|`` with ``X`` the input of ``down_proj`` over every calibration
token of the task. Generation is calibrated on real denoising forwards (every timestep, cond and
uncond rows), understanding on image + question prefills; the two give different keep sets, which
is the paper's "parameter specialization".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..runtime.request import TASKS
from .plan import Plan, decoder_layers, keep_count

DEFAULT_SAMPLES = 8


def wanda_scores(input_sq_sums: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
    """Per-neuron scores (float64): ``sqrt(input_sq_sums) * |down_weight|.sum(0)``.

    ``input_sq_sums[j]`` is the sum over calibration tokens of ``X_j^2``; ``down_weight`` is
    ``(hidden, intermediate)``, so column ``j`` holds neuron ``j``'s outgoing weights.
    """
    if down_weight.dim() != 2 or input_sq_sums.shape != (down_weight.shape[1],):
        raise ValueError(f"{tuple(input_sq_sums.shape)} input norms do not fit a down_proj weight of shape "
                         f"{tuple(down_weight.shape)}")
    weight = down_weight.detach().to(device="cpu", dtype=torch.float64)
    return input_sq_sums.to(device="cpu", dtype=torch.float64).sqrt() * weight.abs().sum(dim=0)


def select_keep(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` top-scoring neuron indices, sorted ascending (int64); ties go to the lower index."""
    if not 0 < count <= scores.numel():
        raise ValueError(f"cannot keep {count} of {scores.numel()} neurons")
    # A stable descending sort keeps equal scores in index order, so ties are deterministic.
    order = torch.sort(scores, descending=True, stable=True).indices[:count]
    return torch.sort(order).values.to(torch.int64)


class DownProjInputs:
    """Context manager: accumulates, per layer, the float64 sum of squares of each ``down_proj`` input
    feature and the number of tokens seen, through forward pre-hooks removed on exit (even on error).

    ``token_mask``, when set, selects the tokens that count (nonzero entries): its shape must be the
    ``down_proj`` input's leading dimensions (batch, sequence), e.g. an attention mask that leaves
    padding out of the norms. A mask of another shape raises ``ValueError`` rather than guessing.
    """

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        self.layers = list(layers)
        self.sq_sums = [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for layer in self.layers]
        self.tokens = [0] * len(self.layers)
        self.token_mask: torch.Tensor | None = None
        self._handles: list = []

    def _hook(self, index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            if self.token_mask is not None:
                if tuple(self.token_mask.shape) != tuple(x.shape[:-1]):
                    raise ValueError(f"token mask of shape {tuple(self.token_mask.shape)} does not cover the "
                                     f"FFN input of shape {tuple(x.shape)} (batch, tokens, features)")
                x = x[self.token_mask.to(device=x.device, dtype=torch.bool)]
            flat = x.reshape(-1, x.shape[-1]).to(torch.float64)
            self.sq_sums[index] += flat.pow(2).sum(dim=0).cpu()
            self.tokens[index] += flat.shape[0]

        return hook

    def __enter__(self) -> DownProjInputs:
        try:
            for i, layer in enumerate(self.layers):
                self._handles.append(layer.mlp.down_proj.register_forward_pre_hook(self._hook(i)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _is_latent(image) -> bool:
    return isinstance(image, torch.Tensor) and image.dim() == 4


def _image_to_latent(model, image) -> torch.Tensor:
    """A latent (1, c, h, w) from a latent tensor, a (3, H, W) tensor in [0, 1], a PIL image or a
    uint8 (H, W, 3) array (a scene render)."""
    if _is_latent(image):
        return image
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image arrays must be (H, W, 3), got {image.shape}")
        scale = 255.0 if image.dtype == np.uint8 else 1.0
        image = torch.from_numpy(np.ascontiguousarray(image)).float().div(scale).permute(2, 0, 1)
    return model.encode_image(image)


def _default_samples(n: int, seed: int) -> tuple[list[str], list[np.ndarray], list[str]]:
    """Captions, renders and one question per scene from the training split, deterministic for ``seed``."""
    from flashu_compile.scenes.dataset import make_split

    scenes = make_split("train", n, seed=seed)
    # Cycle through each scene's question kinds so colour, shape, count and relation questions all occur.
    questions = [scene.qa[i % len(scene.qa)][0] for i, scene in enumerate(scenes)]
    return [s.caption for s in scenes], [s.render() for s in scenes], questions


def _check_args(model, tasks, prune_ratio, multiple, steps, samples, batch_size) -> list[str]:
    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        raise ValueError(f"at least one task is needed, choose from {TASKS}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; calibration knows {TASKS}")
    if not 0 <= prune_ratio < 1:
        raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio}")
    if int(multiple) != multiple or multiple < 1:
        raise ValueError(f"multiple must be an integer >= 1, got {multiple}")
    if "t2i" in tasks and steps < 2:
        raise ValueError(f"steps must be >= 2 grid points (steps - 1 model calls), got {steps}")
    if samples < 1 or batch_size < 1:
        raise ValueError(f"samples and batch_size must be >= 1, got {samples} and {batch_size}")
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("model has no tokenizer; calibration builds token rows (use Showo2.attach(tokenizer=...))")
    return tasks


@torch.no_grad()
def calibrate(
    model,
    tasks: Sequence[str] = TASKS,
    prompts: Sequence[str] | None = None,
    images: Sequence | None = None,
    questions: Sequence[str] | None = None,
    prune_ratio: float = 0.2,
    multiple: int = 64,
    steps: int = 10,
    guidance: float = 7.5,
    seed: int = 0,
    progress: bool = True,
    *,
    samples: int = DEFAULT_SAMPLES,
    batch_size: int = 8,
) -> Plan:
    """Calibrate task-specific FFN keep sets for every LLM decoder layer of a Show-o2 model.

    - ``t2i``: ``prompts`` are denoised with :func:`generate_latents` (``steps`` grid points,
      classifier-free ``guidance``), ``batch_size`` prompts per batch; every model call counts.
    - ``mmu``: each ``(image, question)`` pair is prefilled (image latent + question row through
      the whole LLM). ``images`` are latents (1, c, h, w), (3, H, W) tensors in [0, 1], PIL images or
      uint8 (H, W, 3) arrays; images and questions come in pairs.

    Missing prompts / images+questions are the first ``samples`` scenes of the training split for
    ``seed``. Each task keeps ``I - floor(I * prune_ratio)`` neurons per layer, rounded down to a
    multiple of ``multiple`` (see :func:`keep_count`), the top Wanda scores, sorted by index.
    """
    tasks = _check_args(model, tasks, prune_ratio, multiple, steps, samples, batch_size)
    multiple = int(multiple)
    if (images is None) != (questions is None):
        raise ValueError("images and questions go in pairs: pass both or neither")
    if images is not None and len(images) != len(questions):
        raise ValueError(f"{len(images)} images for {len(questions)} questions")
    if isinstance(prompts, str):
        prompts = [prompts]
    defaults = {"prompts": prompts is None and "t2i" in tasks, "images": images is None and "mmu" in tasks}
    if defaults["prompts"] or defaults["images"]:
        default_prompts, default_images, default_questions = _default_samples(samples, seed)
        prompts = default_prompts if prompts is None else prompts
        if images is None:
            images, questions = default_images, default_questions
    if "t2i" in tasks and not prompts:
        raise ValueError("t2i calibration needs at least one prompt")
    if "mmu" in tasks and not images:
        raise ValueError("mmu calibration needs at least one image and question")
    if "mmu" in tasks and model.codec is None and not all(_is_latent(image) for image in images):
        raise ValueError("understanding calibration needs the model's codec to encode images (attach(codec=...)), "
                         "or pass image latents of shape (1, c, h, w)")

    from flashu_compile.models.showo2 import understanding
    from flashu_compile.models.showo2.sampling import generate_latents

    named = decoder_layers(model)
    layers = [layer for _, layer in named]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    t2i_batches = [list(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)] \
        if "t2i" in tasks else []
    mmu_pairs = list(zip(images, questions, strict=True)) if "mmu" in tasks else []
    bar = tqdm(total=len(t2i_batches) + len(mmu_pairs), desc="calibrating", disable=not progress)
    recorded: dict[str, DownProjInputs] = {}
    try:
        for task in tasks:
            with DownProjInputs(layers) as rec:
                if task == "t2i":
                    for b, batch in enumerate(t2i_batches):
                        bar.set_postfix_str(f"t2i batch {b + 1}/{len(t2i_batches)}")
                        # The eager model and the plain sampler (cond + uncond rows at every step, no
                        # schedule): the hooks see every FFN input the unmodified model computes.
                        generate_latents(model, model.tokenizer, batch, steps=steps, guidance=guidance,
                                         seed=seed + b, progress=False)
                        bar.update()
                else:
                    for k, (image, question) in enumerate(mmu_pairs):
                        bar.set_postfix_str(f"mmu pair {k + 1}/{len(mmu_pairs)}")
                        latent = _image_to_latent(model, image).to(device=device, dtype=model.dtype)
                        rows, embeds = understanding.prepare(model, model.tokenizer, latent, question)
                        model.llm_hidden(embeds, rows.attention_mask)
                        bar.update()
            recorded[task] = rec
    finally:
        bar.close()
        model.train(was_training)

    samples_used = {"t2i": len(prompts) if "t2i" in tasks else 0, "mmu": len(mmu_pairs)}
    settings = {
        "tasks": tasks,
        "prune_ratio": float(prune_ratio),
        "multiple": multiple,
        "steps": int(steps),
        "guidance": float(guidance),
        "seed": int(seed),
        "samples": {task: samples_used[task] for task in tasks},
        "tokens": {task: rec.tokens[0] for task, rec in recorded.items()},
        "dtype": str(model.dtype).removeprefix("torch."),
        "dataset_defaults": defaults,  # whether the scenes training split supplied the data
    }
    return plan_from_records(model, named, recorded, prune_ratio, multiple, settings)


def plan_from_records(model: nn.Module, named: Sequence[tuple[str, nn.Module]], recorded: dict[str, DownProjInputs],
                      prune_ratio: float, multiple: int, settings: dict) -> Plan:
    """The :class:`Plan` of the recorded ``down_proj`` inputs: per task and layer, the Wanda scores and the
    :func:`keep_count` top-scoring neurons (see :meth:`Plan.for_model`).

    ``named`` is :func:`decoder_layers` of ``model``; ``settings`` must hold ``prune_ratio`` and
    ``multiple`` (``Plan.validate`` recounts the keep sets from them).
    """
    layers = [layer for _, layer in named]
    sizes = [layer.mlp.down_proj.in_features for layer in layers]
    counts = [keep_count(size, prune_ratio, multiple) for size in sizes]
    scores = {task: [wanda_scores(sq, layer.mlp.down_proj.weight)
                     for sq, layer in zip(rec.sq_sums, layers, strict=True)]
              for task, rec in recorded.items()}
    keep = {task: [select_keep(s, n) for s, n in zip(per_layer, counts, strict=True)]
            for task, per_layer in scores.items()}
    return Plan.for_model(model, keep, scores, settings)
