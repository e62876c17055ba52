"""What a sampler asks of the compiler: the guidance scale of each model call, and the request its calls form.

A model's sampler knows nothing of the compiler. It is handed an object of this shape by whoever compiled
its steps (``flashu_compile.tasks.compile_tasks``, or a model's ``compile`` that asks its backend, see
:func:`flashu_compile.backend.sampler_rules`) and calls it without knowing what is behind:
:meth:`SamplerRules.scales` for the scales of a request's calls, :meth:`SamplerRules.request` around the
calls, advanced before each. A sampler given none runs every call at the request's scale, outside any
request (compiled programs then serve implicit requests, see :mod:`runtime.request`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from ..validate import warn_user
from .request import Request, request
from .schedule import GuidanceSchedule, guidance_scales, ignores_guidance


@dataclass(frozen=True)
class SamplerRules:
    """A guidance schedule (None: every call at the request's scale) under ``semantics`` step rules."""

    guidance_schedule: GuidanceSchedule = None
    semantics: str = "project"

    def scales(self, calls: int, guidance: float, explicit: bool = True) -> list[float]:
        """The scale of each of ``calls`` model calls for a request at scale ``guidance`` (s0). An absolute schedule
        sets every call's scale itself: a ``guidance`` the caller gave (``explicit``) is then reported as unused."""
        schedule = self.guidance_schedule
        if explicit and ignores_guidance(schedule, calls, self.semantics):
            warn_user(f"guidance={guidance!r} is ignored: the compiled flashu options' absolute guidance_schedule "
                      f"{list(schedule)} sets every step's scale (a relative schedule, {{'relative': [(fraction, "
                      "multiple), ...]}, scales the request's guidance instead)")
        return guidance_scales(schedule, calls, guidance, self.semantics)

    def request(self, task: str, calls: int) -> contextlib.AbstractContextManager[Request]:
        """The request of ``calls`` model calls of ``task`` the sampler makes; it advances it before each call."""
        return request(task, calls)
