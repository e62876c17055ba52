"""When each step-dependent decision fires, under the project's rules or the public FlashU code's.

Steps are model calls counted 1..S. The public code counts its ``total_steps`` in grid points
(S + 1) and stores the head cache on multiples of T_cache, so its first T_cache - 1 steps never
reuse anything; ``flashu-reference`` reproduces that exactly, ``project`` refreshes on the first
step of each window instead. Every difference is listed in the README.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..validate import MAX_GUIDANCE, check_float, check_int, check_schedule

REFERENCE = "flashu-reference"


@dataclass(frozen=True)
class StepRules:
    semantics: str = "project"  # "project" or "flashu-reference"
    hybrid_tau: int = 11
    skip_interval: int = 10  # T_LS
    cache_interval: int = 5  # T_cache

    @classmethod
    def from_options(cls, options) -> StepRules:
        return cls(options.step_semantics, options.hybrid_tau, options.skip_interval, options.cache_interval)

    def full_phase(self, step: int, calls: int) -> bool:
        """Full network (no pruning, skipping or head cache) for the final steps."""
        if self.semantics == REFERENCE:
            return step > (calls + 1) - self.hybrid_tau  # total_steps = grid points
        return step > calls - self.hybrid_tau  # the last tau model calls

    def recalculate(self, step: int) -> bool:
        """Run the full depth and measure layer importance on this step."""
        return (step - 1) % self.skip_interval == 0

    def head_action(self, step: int, have_cache: bool) -> str:
        """"compute" (no store), "store" (compute and keep) or "reuse" for the flow-head blocks."""
        if self.semantics == REFERENCE:
            if step % self.cache_interval == 0:
                return "store"
            return "reuse" if have_cache else "compute"
        if (step - 1) % self.cache_interval == 0 or not have_cache:
            return "store"
        return "reuse"


def guidance_scales(schedule: tuple[tuple[int, float], ...] | None, calls: int, default: float,
                    semantics: str = "project") -> list[float]:
    """The guidance scale of each model call 1..calls for a piecewise-constant schedule.

    ``flashu-reference``: segment lengths count model calls; calls past the schedule use
    ``default`` (the public rule). ``project``: the segments are stretched over the actual
    number of calls, so a schedule written for 35 grid points keeps its proportions at 50.
    """
    schedule = check_schedule("guidance_schedule", schedule)
    calls = check_int("calls", calls, low=0)
    default = check_float("guidance", default, low=0.0, high=MAX_GUIDANCE)
    if schedule is None:
        return [default] * calls
    if semantics == REFERENCE:
        ends, bound = [], 0
        for steps, scale in schedule:
            bound += steps
            ends.append((bound, scale))
        return [next((scale for end, scale in ends if step <= end), default) for step in range(1, calls + 1)]
    total = sum(steps for steps, _ in schedule)
    scales, done = [], 0
    for steps, scale in schedule:
        done += steps
        end = round(done / total * calls)
        scales.extend([scale] * (end - len(scales)))
    return scales
