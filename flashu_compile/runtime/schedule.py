"""When each step-dependent decision fires, under the project's rules or the public FlashU code's.

Steps are model calls counted 1..S. The public code counts its ``total_steps`` in grid points
(S + 1) and stores the head cache on multiples of T_cache, so its first T_cache - 1 steps never
reuse anything; ``flashu-reference`` reproduces that exactly, ``project`` refreshes on the first
step of each window instead. Every difference is listed in docs/presets.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class RelativeSchedule:
    """Guidance as multiples of the request's scale s0 over fractions of its model calls.

    ``segments`` are ``(fraction of the calls, multiple of s0)`` pairs in order. Invariants,
    checked on construction: at least one segment, every call fraction in (0, 1], the fractions
    summing to 1 (within 1e-6), every multiple finite and >= 0. The paper's schedule is
    ``RelativeSchedule(((0.7, 0.75), (0.3, 1.0)))``: 0.75 s0 for the first 70% of the calls, s0
    for the last 30%.
    """

    segments: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "segments", _relative_segments("RelativeSchedule", self.segments))


# The form an option or a JSON value gives a relative schedule in: {"relative": [[fraction, multiple], ...]}.
RELATIVE_KEY = "relative"
GuidanceSchedule = tuple[tuple[int, float], ...] | RelativeSchedule | None


def _relative_segments(name: str, segments: Any) -> tuple[tuple[float, float], ...]:
    if isinstance(segments, (str, bytes)) or not isinstance(segments, Sequence) or not segments:
        raise ValueError(f"{name} must be a non-empty list of (fraction of the calls, multiple of the guidance) "
                         f"pairs, got {type(segments).__name__} {segments!r}")
    checked = []
    for i, segment in enumerate(segments):
        if isinstance(segment, (str, bytes)) or not isinstance(segment, Sequence) or len(segment) != 2:
            raise ValueError(f"{name}[{i}] must be a (fraction of the calls, multiple of the guidance) pair, "
                             f"got {type(segment).__name__} {segment!r}")
        fraction, multiple = segment
        checked.append((check_float(f"{name}[{i}] fraction of the calls", fraction, 0.0, 1.0, low_open=True),
                        check_float(f"{name}[{i}] multiple of the guidance", multiple, 0.0, MAX_GUIDANCE)))
    total = math.fsum(f for f, _ in checked)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"{name}: the fractions of the calls must sum to 1, got {total:g} "
                         f"({' + '.join(f'{f:g}' for f, _ in checked)})")
    return tuple(checked)


def check_guidance_schedule(name: str, schedule: Any) -> GuidanceSchedule:
    """A guidance schedule in one of its two forms, normalised; anything else is a ValueError naming ``name``.

    - absolute: ``[(steps, scale), ...]``, ``steps`` an int >= 1 and ``scale`` the guidance itself;
    - relative: ``{"relative": [(fraction, multiple), ...]}`` or a :class:`RelativeSchedule`, each
      segment's scale being ``multiple`` times the request's guidance.
    The two cannot be mistaken for each other: one is a list of pairs, the other a one-key mapping.
    """
    if schedule is None or isinstance(schedule, RelativeSchedule):
        return schedule
    if isinstance(schedule, Mapping):
        if list(schedule) != [RELATIVE_KEY]:
            raise ValueError(f"{name} as a mapping must be {{{RELATIVE_KEY!r}: [(fraction of the calls, multiple of "
                             f"the guidance), ...]}}, got keys {sorted(map(repr, schedule))}")
        return RelativeSchedule(_relative_segments(f"{name}[{RELATIVE_KEY!r}]", schedule[RELATIVE_KEY]))
    try:
        return check_schedule(name, schedule)
    except ValueError as err:
        fractional = isinstance(schedule, Sequence) and any(
            isinstance(s, Sequence) and len(s) == 2 and isinstance(s[0], float) and not float(s[0]).is_integer()
            for s in schedule)
        if fractional:  # steps written as fractions: the relative form was probably meant
            raise ValueError(f"{err}; for fractions of the calls and of the request's guidance give "
                             f"{{{RELATIVE_KEY!r}: [(fraction, multiple), ...]}}") from None
        raise


def _stretch(weights: Sequence[float], scales: Sequence[float], calls: int) -> list[float]:
    """Each scale over its weight's share of ``calls``, boundaries rounded to the nearest call."""
    total, done, out = math.fsum(weights), 0.0, []
    for weight, scale in zip(weights, scales, strict=True):
        done += weight
        end = round(done / total * calls)
        out.extend([scale] * (end - len(out)))
    return out + [scales[-1]] * (calls - len(out))  # a float sum a hair under 1 must not leave the last call out


def guidance_scales(schedule: GuidanceSchedule, calls: int, default: float, semantics: str = "project") -> list[float]:
    """The guidance scale of each model call 1..calls; ``default`` is the request's guidance s0.

    Relative schedule: segment i covers its fraction of the calls (boundaries rounded to the
    nearest call) at ``multiple * s0``, under either step semantics; the paper's ((0.7, 0.75),
    (0.3, 1.0)) at 34 calls (35 grid points) is 24 calls at 0.75 s0 and 10 at s0, which at
    s0 = 10 is the public code's absolute [(24, 7.5), (11, 10.0)] call for call.
    Absolute schedule, ``flashu-reference``: segment lengths count model calls; calls past the
    schedule use ``default`` (the public rule). ``project``: the segments are stretched over the
    actual number of calls, so a schedule written for 35 grid points keeps its proportions at 50.
    """
    schedule = check_guidance_schedule("guidance_schedule", schedule)
    calls = check_int("calls", calls, low=0)
    default = check_float("guidance", default, low=0.0, high=MAX_GUIDANCE)
    if schedule is None:
        return [default] * calls
    if isinstance(schedule, RelativeSchedule):
        scales = [check_float(f"guidance {default:g} x {multiple:g} (segment {i})", multiple * default, 0.0,
                              MAX_GUIDANCE) for i, (_, multiple) in enumerate(schedule.segments)]
        return _stretch([fraction for fraction, _ in schedule.segments], scales, calls)
    if semantics == REFERENCE:
        ends, bound = [], 0
        for steps, scale in schedule:
            bound += steps
            ends.append((bound, scale))
        return [next((scale for end, scale in ends if step <= end), default) for step in range(1, calls + 1)]
    return _stretch([steps for steps, _ in schedule], [scale for _, scale in schedule], calls)


def ignores_guidance(schedule: GuidanceSchedule, calls: int, semantics: str = "project") -> bool:
    """Whether ``schedule`` sets every call's scale without the request's guidance (an absolute one covering them)."""
    schedule = check_guidance_schedule("guidance_schedule", schedule)
    if schedule is None or isinstance(schedule, RelativeSchedule):
        return False
    return semantics != REFERENCE or sum(steps for steps, _ in schedule) >= calls
