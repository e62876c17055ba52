"""Text-to-image sampling: Euler (or Heun) integration of the flow ODE with classifier-free guidance.

t = 0 is noise and t = 1 is data, the model predicts v = x1 - x0. The grid has ``steps`` points
t_i = s / (s + k - k s), s = linspace(0, 1, steps), shift k; that is ``steps - 1`` model calls,
as in the official evaluation scripts (``num_inference_steps`` counts grid points).
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from ...validate import MAX_GUIDANCE, MAX_SEED, MAX_SHIFT, MAX_STEPS, check_float, check_int
from .sequences import Rows, t2i_rows

DEFAULT_GUIDANCE = 7.5  # the official evaluation scripts' scale

# (text_tokens, latents, t, attention_mask, modality_positions) -> velocity
DenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class SamplerRules(Protocol):
    """What the sampler asks of whoever compiled its steps (a compiler's rules; the sampler imports none).

    ``scales(calls, guidance, explicit)``: the scale of each model call of a request at scale ``guidance``
    (``explicit``: the caller chose it). ``request(task, calls)``: a context around the request's calls whose
    value is advanced (``.advance()``) before each call.
    """

    def scales(self, calls: int, guidance: float, explicit: bool = True) -> list[float]: ...

    def request(self, task: str, calls: int) -> contextlib.AbstractContextManager[Any]: ...


def shift_time(s: torch.Tensor, shift: float) -> torch.Tensor:
    """The official time shift s / (s + k - k s): with k > 1 it moves times towards the noise end (t = 0)."""
    shift = check_float("shift", shift, 0.0, MAX_SHIFT, low_open=True)
    return s / (s + shift - shift * s)


def time_grid(steps: int, shift: float = 3.0) -> torch.Tensor:
    """The official shifted time grid with ``steps`` points from 0 to 1 (fp32)."""
    # Grid points: steps - 1 model calls, so at least 2.
    steps = check_int("steps", steps, 2, MAX_STEPS)
    return shift_time(torch.linspace(0, 1, steps), shift)


SOLVERS = ("euler", "heun")


def needs_uncond(scale: float) -> bool:
    """Whether a guidance scale needs the unconditional rows: v_uncond + s (v_cond - v_uncond) is v_cond itself at
    s = 1, as at s = 0 (the unguided branch), so those calls run the cond rows alone and the batch halves."""
    return scale != 0 and scale != 1


def check_solver(solver: str) -> str:
    """``solver`` if it is one of :data:`SOLVERS`, else a ValueError naming them."""
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise ValueError(f"solver must be one of {list(SOLVERS)}, got {solver!r}")
    return solver


def integrate_cfg(
    denoise: DenoiseFn,
    rows: Rows,
    noise: torch.Tensor,
    grid: torch.Tensor,
    guidance: float | list[float],
    progress: bool = True,
    rules: SamplerRules | None = None,
    solver: str = "euler",
) -> torch.Tensor:
    """Integrate the flow ODE from ``noise`` over ``grid``; rows hold cond rows first, then uncond rows if guided.

    ``solver``: "euler" (one model call per grid interval, the official sampler) or "heun" (Heun's
    second-order method: a second call at the interval's end on the Euler prediction, and the mean of
    the two velocities; two calls per interval). ``guidance`` is one scale or one per grid interval
    (both of Heun's calls use it). A call with scale 0 runs the cond rows only (the official
    sampler's unguided branch), and so does one with scale 1, whose combination is the cond velocity
    itself: the batch halves on those intervals. With ``rules``, the calls run
    inside its request, so compiled programs know which call of how many they serve. The latent stays
    fp32 between steps whatever the model dtype, like the official sampler.
    """
    check_solver(solver)
    x = noise.float()
    intervals = len(grid) - 1
    if isinstance(guidance, numbers.Real):
        scales = [check_float("guidance", guidance, 0.0, MAX_GUIDANCE)] * intervals
    else:
        scales = [check_float(f"guidance[{i}]", s, 0.0, MAX_GUIDANCE) for i, s in enumerate(guidance)]
    if len(scales) != intervals:
        raise ValueError(f"{len(scales)} guidance scales for {intervals} grid intervals")
    b = x.shape[0]
    guided = rows.text_tokens.shape[0] == 2 * b
    if not guided and rows.text_tokens.shape[0] != b:
        raise ValueError(f"{rows.text_tokens.shape[0]} rows for {b} latents")
    if not guided and any(needs_uncond(s) for s in scales):
        raise ValueError("guidance other than 0 and 1 needs rows with unconditional rows "
                         "(t2i_rows(..., guidance=True))")
    per_interval = 2 if solver == "heun" else 1

    def velocity(x: torch.Tensor, t: torch.Tensor, scale: float, req) -> torch.Tensor:
        if req is not None:
            req.advance()
        n = 2 * b if needs_uncond(scale) else b
        model_x = torch.cat([x, x]) if n > b else x
        v = denoise(rows.text_tokens[:n], model_x, t.expand(n), rows.attention_mask[:n],
                    rows.modality_positions[:n]).float()
        if n > b:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + scale * (v_cond - v_uncond)
        return v

    with rules.request("t2i", per_interval * intervals) if rules is not None else contextlib.nullcontext() as req:
        for i in tqdm(range(intervals), desc="denoising", disable=not progress, leave=False):
            h = grid[i + 1] - grid[i]
            v = velocity(x, grid[i], scales[i], req)
            if solver == "heun":
                v = (v + velocity(x + h * v, grid[i + 1], scales[i], req)) / 2
            x = x + h * v
    return x


@torch.no_grad()
def generate_latents(
    model,
    tokenizer,
    prompts: list[str],
    steps: int = 50,
    guidance: float | None = None,
    shift: float = 3.0,
    seed: int = 0,
    noise: torch.Tensor | None = None,
    max_text_len: int | None = None,
    denoise: DenoiseFn | None = None,
    progress: bool = True,
    rules: SamplerRules | None = None,
    solver: str = "euler",
) -> torch.Tensor:
    """Latents (B, c, H, W) for ``prompts`` at the model's default resolution, by ``solver`` (see
    :func:`integrate_cfg`: "heun" makes two model calls per grid interval).

    ``denoise`` replaces ``model.denoise`` (a compiled one). ``guidance`` is the request's scale s0
    (default :data:`DEFAULT_GUIDANCE`). ``rules`` (those of the compiler ``denoise`` came from; None:
    every call at s0, outside any request) give each call's scale, from s0 unless the compiler's
    schedule fixes them (and then says so when ``guidance`` was given), and the request the calls
    form. Every argument is checked before any work.
    """
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts must be a str or a non-empty list of str, got {type(prompts).__name__}")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompts[{i}] must be a str, got {type(prompt).__name__} {prompt!r}")
    explicit = guidance is not None
    guidance = check_float("guidance", DEFAULT_GUIDANCE if guidance is None else guidance, 0.0, MAX_GUIDANCE)
    steps = check_int("steps", steps, 2, MAX_STEPS)
    shift = check_float("shift", shift, 0.0, MAX_SHIFT, low_open=True)
    seed = check_int("seed", seed, 0, MAX_SEED)
    check_solver(solver)
    cfg = model.config
    if max_text_len is not None:
        max_text_len = check_int("max_text_len", max_text_len, 1)
    c, (h, w) = cfg.image_latent_dim, cfg.latent_size
    if noise is None:
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(len(prompts), c, h, w, generator=gen)
    elif noise.shape != (len(prompts), c, h, w):
        raise ValueError(f"noise must be {(len(prompts), c, h, w)}, got {tuple(noise.shape)}")
    scales = rules.scales(steps - 1, guidance, explicit) if rules is not None else [guidance] * (steps - 1)
    rows = t2i_rows(tokenizer, prompts, cfg.num_image_tokens, max_text_len or cfg.max_text_len,
                    guidance=any(needs_uncond(s) for s in scales), dtype=model.dtype)
    # Noise is drawn on the CPU so a seed gives the same image on every device.
    device = model.device
    denoise = denoise or model.denoise
    return integrate_cfg(denoise, rows.to(device), noise.to(device), time_grid(steps, shift).to(device), scales,
                         progress, rules, solver)
