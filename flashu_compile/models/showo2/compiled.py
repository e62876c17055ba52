"""A Show-o2 with its task entry points compiled: what :meth:`Showo2.compile_tasks` returns.

The compiler's state lives here, not on the model: the compiled entry points and the flashu
options they were compiled with. The model is left as it was, so the same model can be compiled
several ways at once, and anything that runs the model itself (calibration, an eager reference)
runs it unmodified.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ...options import FlashUOptions

# The entry points generate_images() and answer() call, by name.
ENTRIES = ("embed", "denoise", "prefill", "decode")


@dataclass(frozen=True)
class CompiledShowo2:
    """``model``'s entry points compiled (``entries``, one per name of :data:`ENTRIES`), and the flashu options
    they were compiled with (None for another backend).

    ``generate_images`` and ``answer`` are the model's, run through the compiled entries; the options' guidance
    schedule, a sampler rule, applies to ``generate_images``.
    """

    model: nn.Module  # a Showo2 (this module stays below modeling, which returns it)
    entries: Mapping[str, Callable]
    options: FlashUOptions | None = None

    def __post_init__(self) -> None:
        if set(self.entries) != set(ENTRIES):
            raise ValueError(f"entries must be exactly {list(ENTRIES)}, got {sorted(self.entries)}")

    @torch.no_grad()
    def generate_images(
        self, prompts: list[str] | str, steps: int = 50, guidance: float | None = None, shift: float = 3.0,
        seed: int = 0, progress: bool = True,
    ) -> torch.Tensor:
        """:meth:`Showo2.generate_images` through the compiled denoise, with the compiled options' guidance schedule."""
        return self.model.generate_images(prompts, steps=steps, guidance=guidance, shift=shift, seed=seed,
                                          progress=progress, denoise=self.entries["denoise"], options=self.options)

    @torch.no_grad()
    def answer(self, image, question: str, max_new_tokens: int = 300) -> str:
        """:meth:`Showo2.answer` through the compiled image embedding, prefill and decode step."""
        return self.model.answer(image, question, max_new_tokens=max_new_tokens, entries=self.entries)
