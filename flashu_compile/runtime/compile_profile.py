"""Where compile time goes: named phases timed while a profile is active.

The compiler marks its own phases (the structure index, each pass, outlining, the lowering of
each piece, specializations) with :func:`phase`; outside :func:`profiling` a phase costs one
context-variable read. Phases nest (a pass outlines regions; a region's lowering may compile
the pieces inside it), and each records its *own* time, its children's subtracted, so the
phases of a profile never count a second twice and add up to at most the span profiled.

Dynamo's share comes from its own timers (``torch._dynamo.utils.compilation_time_metrics``):
tracing and guard building are its whole compile less the time in the backend it calls, and
the backend's time not inside a flashu phase is reported as the backend's rest (for a plain
Inductor graph, all of Inductor's compile). What is left of the span is running the request.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import wraps
from typing import Any, TypeVar

import torch
from torch._dynamo.utils import compilation_time_metrics, counters

# dynamo's timer of a whole frame compile, and of the backend call inside it
_DYNAMO_COMPILE = "_compile.compile_inner"
_DYNAMO_BACKEND = "OutputGraph.call_user_compiler"

DYNAMO = "dynamo: tracing and guards"
BACKEND_REST = "backend: rest"
REQUEST = "rest: running the request"


@dataclass
class Phase:
    seconds: float = 0.0  # own time: nested phases' time is theirs
    count: int = 0


@dataclass
class _Open:
    name: str
    start: float
    children: float = 0.0  # inclusive time of the phases closed inside this one


@dataclass
class CompileProfile:
    """Phases by name, in the order first seen. ``total_s`` is the profiled span once it closes."""

    phases: dict[str, Phase] = field(default_factory=dict)
    total_s: float = 0.0
    # Compile caches over the span: Inductor's FX graph cache and AOTAutograd's, hits/misses/bypasses (a warm
    # start should miss nothing; a miss is a graph compiled from scratch).
    caches: dict[str, int] = field(default_factory=dict)
    in_dynamo_s: float = 0.0  # inclusive time of outermost phases that ran inside a dynamo compile
    _stack: list[_Open] = field(default_factory=list)

    def add(self, name: str, seconds: float) -> None:
        entry = self.phases.setdefault(name, Phase())
        entry.seconds += seconds
        entry.count += 1

    def rows(self) -> list[tuple[str, float, int]]:
        """``(phase, seconds, count)`` per phase; the dynamo, backend and request rows once the span has closed."""
        return [(name, p.seconds, p.count) for name, p in self.phases.items()]

    def to_dict(self) -> dict[str, Any]:
        return {"total_s": self.total_s, "caches": dict(self.caches),
                "phases": [{"phase": name, "seconds": s, "count": n} for name, s, n in self.rows()]}


_ACTIVE: ContextVar[CompileProfile | None] = ContextVar("flashu_compile_profile", default=None)

# (dynamo counter group, counter) -> how a profile names it
_CACHE_COUNTERS = {("inductor", "fxgraph_cache_hit"): "fx graph cache hits",
                   ("inductor", "fxgraph_cache_miss"): "fx graph cache misses",
                   ("inductor", "fxgraph_cache_bypass"): "fx graph cache bypasses",
                   ("aot_autograd", "autograd_cache_hit"): "aot autograd cache hits",
                   ("aot_autograd", "autograd_cache_miss"): "aot autograd cache misses"}


def _cache_counts() -> dict[str, int]:
    return {label: counters[group][key] for (group, key), label in _CACHE_COUNTERS.items()}


def _timer_total(name: str, since: int) -> float:
    return sum(compilation_time_metrics.get(name, [])[since:])


@contextlib.contextmanager
def profiling() -> Iterator[CompileProfile]:
    """Record every phase inside the block, then dynamo's share and the rest of the block's wall-clock."""
    profile = CompileProfile()
    # dynamo keeps each timer as a list of durations; what this block adds starts at today's length
    # (a reset that empties them inside the block restarts from 0).
    marks = {name: len(compilation_time_metrics.get(name, [])) for name in (_DYNAMO_COMPILE, _DYNAMO_BACKEND)}
    token = _ACTIVE.set(profile)
    before = _cache_counts()
    start = time.perf_counter()
    try:
        yield profile
    finally:
        profile.total_s = time.perf_counter() - start
        _ACTIVE.reset(token)
        # A counter reset inside the block (counters.clear()) restarts it from 0, as the timers do.
        profile.caches = {label: n - before[label] if n >= before[label] else n for label, n in _cache_counts().items()}
        timers = {name: _timer_total(name, mark if len(compilation_time_metrics.get(name, [])) >= mark else 0)
                  for name, mark in marks.items()}
        backend = timers[_DYNAMO_BACKEND]
        if timers[_DYNAMO_COMPILE]:
            profile.add(DYNAMO, timers[_DYNAMO_COMPILE] - backend)
            profile.add(BACKEND_REST, max(backend - profile.in_dynamo_s, 0.0))
        accounted = sum(p.seconds for p in profile.phases.values())
        profile.add(REQUEST, max(profile.total_s - accounted, 0.0))


def _in_dynamo_compile() -> bool:
    return torch._guards.TracingContext.try_get() is not None


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the block as phase ``name`` of the active profile (nothing when none is active)."""
    profile = _ACTIVE.get()
    if profile is None:
        yield
        return
    outermost = not profile._stack
    inside_dynamo = outermost and _in_dynamo_compile()
    frame = _Open(name, time.perf_counter())
    profile._stack.append(frame)
    try:
        yield
    finally:
        profile._stack.pop()
        elapsed = time.perf_counter() - frame.start
        profile.add(name, elapsed - frame.children)
        if profile._stack:
            profile._stack[-1].children += elapsed
        elif inside_dynamo:
            profile.in_dynamo_s += elapsed


F = TypeVar("F", bound=Callable[..., Any])


def profiled(name: str) -> Callable[[F], F]:
    """``fn`` with every call timed as phase ``name``."""
    def wrap(fn: F) -> F:
        @wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with phase(name):
                return fn(*args, **kwargs)

        return timed  # type: ignore[return-value]

    return wrap


def piece_kind(gm: torch.nn.Module) -> str:
    """What kind of piece a graph module is, by the name its class was given: a numbered part loses its number
    and the project's prefix (``flashu_layer_3`` -> ``layer``, ``segment_0`` -> ``segment``); a module that
    was given no name (a whole graph, a copy) is ``graph``."""
    name = type(gm).__name__
    if name == "GraphModule":
        return "graph"
    return re.sub(r"_\d+$", "", name).removeprefix("flashu_").replace("_", " ")
