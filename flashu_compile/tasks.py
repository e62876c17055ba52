"""Show-o2's task entry points compiled: :func:`compile_tasks` and the :class:`CompiledShowo2` it returns.

The compiler's side of a compiled Show-o2: which entry points the task methods call, which passes each
entry gets, and the sampler rules of the options. The model is left as it was, so the same model can be
compiled several ways at once, and anything that runs the model itself (calibration, an eager reference)
runs it unmodified. (``model.compile(backend="flashu", ...)``, PyTorch's in-place form, compiles the
model's own calls instead; see ``Showo2.compile``.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .backend import sampler_rules
from .models.showo2 import Showo2, understanding
from .options import PASSES, FlashUOptions
from .runtime.sampler_rules import SamplerRules

# The entry points generate_images() and answer() call, by name.
ENTRIES = ("embed", "denoise", "prefill", "decode")


@dataclass(frozen=True)
class CompiledShowo2:
    """``model``'s entry points compiled (``entries``, one per name of :data:`ENTRIES`), and the flashu options
    they were compiled with (None for another backend).

    ``generate_images`` and ``answer`` are the model's, run through the compiled entries; the options' sampler
    rules (guidance schedule, the request of each image's calls) apply to ``generate_images``.
    """

    model: Showo2
    entries: Mapping[str, Callable]
    options: FlashUOptions | None = None

    def __post_init__(self) -> None:
        if set(self.entries) != set(ENTRIES):
            raise ValueError(f"entries must be exactly {list(ENTRIES)}, got {sorted(self.entries)}")

    @property
    def rules(self) -> SamplerRules | None:
        """The options' sampler rules, for a sampler given the compiled denoise (None for another backend)."""
        return sampler_rules(self.options) if self.options is not None else None

    @torch.no_grad()
    def generate_images(
        self, prompts: list[str] | str, steps: int = 50, guidance: float | None = None, shift: float = 3.0,
        seed: int = 0, progress: bool = True, solver: str = "euler",
    ) -> torch.Tensor:
        """:meth:`Showo2.generate_images` through the compiled denoise, with the options' sampler rules."""
        return self.model.generate_images(prompts, steps=steps, guidance=guidance, shift=shift, seed=seed,
                                          progress=progress, denoise=self.entries["denoise"], rules=self.rules,
                                          solver=solver)

    @torch.no_grad()
    def answer(self, image: Any, question: str, max_new_tokens: int = 300) -> str:
        """:meth:`Showo2.answer` through the compiled image embedding, prefill and decode step."""
        return self.model.answer(image, question, max_new_tokens=max_new_tokens, entries=self.entries)


def compile_tasks(model: Showo2, backend: str = "flashu", options: dict | None = None) -> CompiledShowo2:
    """Compile the four entry points ``model``'s task methods call; the model itself is left unchanged.

    Each entry gets the passes that act on its graphs (the image + question embedding, the vision encoder, has
    nothing they rewrite; a decode step gets no prefill-only pass), so none is reported as not applying. With
    ``backend="flashu"`` the options are checked here, a Plan against the whole model, before any graph compiles.
    """
    entries = {"embed": (model.embed, None), "denoise": (model.denoise, "t2i"),
               "prefill": (understanding.prefill, "mmu"), "decode": (understanding.decode_step, "mmu")}
    if backend != "flashu":
        extra = {"options": options} if options else {}
        return CompiledShowo2(model, {name: torch.compile(fn, backend=backend, fullgraph=name in ("embed", "denoise"),
                                                          **extra)
                                      for name, (fn, _) in entries.items()})
    opts = FlashUOptions.from_dict(options)
    sampler_rules(opts, model)  # the options and a Plan checked at the call

    def entry_options(name: str, task: str | None) -> dict:
        passes = [p for p in opts.passes
                  if task in PASSES[p].tasks and (name != "decode" or PASSES[p].decode_steps)]
        return {**(options or {}), "passes": passes, **({"task": task} if task else {})}

    return CompiledShowo2(model, {name: torch.compile(fn, backend="flashu", options=entry_options(name, task),
                                                      fullgraph=name in ("embed", "denoise"))
                                  for name, (fn, task) in entries.items()}, opts)
