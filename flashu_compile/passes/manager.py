"""Runs rewrite passes over a dynamo FX graph in order, with provenance, timing and dumps.

A pass is ``(gm, context, options) -> PassResult``. It tags every node it creates or replaces
with ``node.meta["flashu_pass"]``; the manager checks the graph after each pass and records
what changed and how long it took, so graph-diff and the benchmarks can report per pass.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.fx

PROVENANCE_KEY = "flashu_pass"


@dataclass
class PassResult:
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)


class PassNotApplicable(Exception):
    """A pass found nothing it can rewrite safely in this graph; the message says why."""


@dataclass
class PassContext:
    """What a pass may read besides the graph: the structure index and this compilation's runtime hooks."""

    index: Any  # graph.StructureIndex
    task: str  # "t2i" or "mmu"
    controller: Any = None  # runtime.guards.Controller the guard ops consult
    plan: Any = None  # calibrate.Plan, when one was given


Pass = Callable[[torch.fx.GraphModule, PassContext, Any], PassResult]


@dataclass
class PassRecord:
    name: str
    changed: bool
    seconds: float
    stats: dict[str, Any]
    skipped_reason: str | None = None


# (pass name, "before" | "after", the live graph, context, record or None) -> None. Set only by graph-diff,
# which must see the exact graphs a compilation produces without a second copy of the pipeline.
PassObserver = Callable[[str, str, torch.fx.GraphModule, Any, PassRecord | None], None]
_OBSERVER: ContextVar[PassObserver | None] = ContextVar("flashu_pass_observer", default=None)


@contextlib.contextmanager
def observe_passes(observer: PassObserver) -> Iterator[None]:
    """Call ``observer`` before and after every pass any :class:`PassManager` runs in this context."""
    token = _OBSERVER.set(observer)
    try:
        yield
    finally:
        _OBSERVER.reset(token)


def tag(node: torch.fx.Node, pass_name: str, replaces: str | None = None) -> torch.fx.Node:
    """Mark a node as made by ``pass_name`` (and which original node it stands for)."""
    node.meta[PROVENANCE_KEY] = {"pass": pass_name, "replaces": replaces}
    return node


class PassManager:
    """Ordered passes; a pass that does not apply is skipped with a warning (strict: an error)."""

    def __init__(self, passes: list[tuple[str, Pass]], strict: bool = False, dump_dir: str | None = None) -> None:
        self.passes = passes
        self.strict = strict
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.records: list[PassRecord] = []

    def _dump(self, gm: torch.fx.GraphModule, step: int, name: str, when: str) -> None:
        if self.dump_dir is None:
            return
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        (self.dump_dir / f"{step:02d}_{name}_{when}.txt").write_text(gm.print_readable(print_output=False))

    def run(self, gm: torch.fx.GraphModule, context: Any, options: Any) -> torch.fx.GraphModule:
        observer = _OBSERVER.get()
        for step, (name, fn) in enumerate(self.passes):
            self._dump(gm, step, name, "before")
            if observer is not None:
                observer(name, "before", gm, context, None)
            start = time.perf_counter()
            try:
                result = fn(gm, context, options)
            except PassNotApplicable as why:
                if self.strict:
                    raise RuntimeError(f"flashu pass {name!r} does not apply: {why}") from why
                warnings.warn(f"flashu pass {name!r} skipped: {why}", stacklevel=2)
                self.records.append(PassRecord(name, False, time.perf_counter() - start, {}, str(why)))
                if observer is not None:
                    observer(name, "after", gm, context, self.records[-1])
                continue
            if result.changed:
                gm.graph.lint()
                gm.recompile()
            self.records.append(PassRecord(name, result.changed, time.perf_counter() - start, result.stats))
            self._dump(gm, step, name, "after")
            if observer is not None:
                observer(name, "after", gm, context, self.records[-1])
        return gm
