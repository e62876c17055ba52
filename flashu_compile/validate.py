"""One set of checks for every number a user hands the public API or the command line, and the one
way the package warns a user (:func:`warn_user`).

Each check returns the value as a plain Python ``int`` or ``float`` (numpy scalars are
numbers too) or raises a ``ValueError`` that names the argument and quotes the value. Booleans
and strings are never numbers here: ``True`` is not a step count and ``"3"`` is not a scale,
so neither is coerced. Floats must be finite: NaN fails every comparison, so a check such as
``guidance < 0`` lets it through, and a NaN or infinite scale yields NaN images or empty answers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import numbers
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Ranges of the sampler's knobs, far beyond any useful value (the official guidance is 1-10, the shift 3,
# 50 grid points), so that a typo such as guidance=75000 is reported instead of served.
MAX_GUIDANCE = 1000.0
MAX_SHIFT = 1e6
MAX_STEPS = 10_000  # time-grid points; the official samplers use 50
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _bounds(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    """The allowed range as text: ``in [0, 1)``, ``>= 1`` or ``<= 10``."""
    def text(x: float) -> str:
        return f"{x:g}" if isinstance(x, float) else str(x)

    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{text(low)}, {text(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {text(low)}"
    return f"{'<' if high_open else '<='} {text(high)}"


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]``; bools, floats (even 2.0) and strings are rejected."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {_describe(value)}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be an int {_bounds(low, high, False)}, got {value!r}")
    return value


def check_float(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float in ``[low, high]`` (an end excluded with ``low_open``/``high_open``).

    Ints are accepted where floats are expected (a scale of 7 is 7.0); bools are not.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {_describe(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise ValueError(f"{name} must be {_bounds(low, high, low_open, high_open)}, got {value!r}")
    return value


def check_schedule(name: str, schedule: Any) -> tuple[tuple[int, float], ...] | None:
    """A guidance schedule: ``None`` or a non-empty sequence of ``(steps >= 1, finite scale >= 0)`` pairs."""
    if schedule is None:
        return None
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence) or not schedule:
        raise ValueError(f"{name} must be None or a non-empty list of (steps, scale) pairs, got {_describe(schedule)}")
    segments = []
    for i, segment in enumerate(schedule):
        if isinstance(segment, (str, bytes)) or not isinstance(segment, Sequence) or len(segment) != 2:
            raise ValueError(f"{name}[{i}] must be a (steps, scale) pair, got {_describe(segment)}")
        steps, scale = segment
        segments.append((check_int(f"{name}[{i}] steps", steps, low=1),
                         check_float(f"{name}[{i}] scale", scale, low=0.0, high=MAX_GUIDANCE)))
    return tuple(segments)


def check_text(name: str, value: Any) -> str:
    """A non-empty string with something besides whitespace (an empty prompt or question is never meant)."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a str, got {_describe(value)}")
    if not value.strip():
        raise ValueError(f"{name} must not be empty, got {value!r}")
    return value


__all__ = ["MAX_GUIDANCE", "MAX_SEED", "MAX_SHIFT", "MAX_STEPS", "check_float", "check_int", "check_schedule",
           "check_text"]


def _package_dir(name: str) -> str | None:
    spec = importlib.util.find_spec(name)  # finds without importing
    return str(Path(spec.origin).parent) if spec is not None and spec.origin else None


# Code that stands between a user's line and a warning: this package, torch (dynamo's frames), transformers
# (generate()), contextlib (request contexts).
_INTERNAL = (*(f"{d}/" for d in (str(Path(__file__).parent), _package_dir("torch"), _package_dir("transformers")) if d),
             contextlib.__file__)


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the user's line that led here: the first caller outside this package,
    torch, transformers and contextlib. The default filter then shows it once per line of the user's code."""
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
