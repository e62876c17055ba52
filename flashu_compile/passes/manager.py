"""Runs rewrite passes over a dynamo FX graph in order, with provenance, timing and dumps.

A pass is ``(gm, context, options) -> PassResult``. It tags every node it creates or replaces
with ``node.meta["flashu_pass"]``; the manager checks the graph after each pass and records
what changed and how long it took, so graph-diff and the benchmarks can report per pass.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.fx

# The pass contract's shared names live below the passes (graph utilities raise and tag too); passes import them here.
from ..graph.rewrite import PROVENANCE_KEY as PROVENANCE_KEY
from ..graph.rewrite import PassNotApplicable, StrictModeError
from ..graph.rewrite import tag as tag
from ..graph.structure import StructureIndex
from ..validate import warn_user


@dataclass
class PassResult:
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)


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


# What each pass did (debug) and what was skipped and why (info); ``logging.getLogger("flashu_compile")`` controls it.
logger = logging.getLogger(__name__)

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


@contextlib.contextmanager
def pass_outcomes() -> Iterator[dict[str, dict[str, Any]]]:
    """Inside the block, what every pass run did; the yielded dict, filled as passes run, holds per pass that ran
    on some graph on how many graphs it acted and why it did not on the others (``{"acted": n, "did_not":
    {reason: graphs}}``), so a measured configuration can never silently hold less than its name says."""
    outcomes: dict[str, dict[str, Any]] = {}

    def seen(name: str, when: str, gm: Any, context: Any, record: PassRecord | None) -> None:
        if when != "after" or record is None:
            return
        entry = outcomes.setdefault(record.name, {"acted": 0, "did_not": {}})
        if record.changed:
            entry["acted"] += 1
        else:
            why = record.skipped_reason or "changed nothing"
            entry["did_not"][why] = entry["did_not"].get(why, 0) + 1

    with observe_passes(seen):
        yield outcomes


def outcomes_text(outcomes: dict[str, dict[str, Any]]) -> str:
    """:func:`pass_outcomes` in one line."""
    if not outcomes:
        return "none ran"
    parts = []
    for name, entry in outcomes.items():
        missed = "; ".join(f"not on {n}: {why}" for why, n in entry["did_not"].items())
        parts.append(f"{name} acted on {entry['acted']} graph(s){' (' + missed + ')' if missed else ''}")
    return ", ".join(parts)


class PassManager:
    """Ordered passes; a pass that does not apply, or fails, is skipped with a warning (strict: an error).

    A ValueError always propagates: it reports bad input (options, a plan), which no fallback can fix.

    A skipped pass leaves no trace: the graph, its attributes and the context's structure index are
    restored to what they were before it ran.
    """

    def __init__(self, passes: list[tuple[str, Pass]], strict: bool = False, dump_dir: str | None = None,
                 expected: frozenset[str] = frozenset()) -> None:
        self.passes = passes
        self.strict = strict
        self.expected = expected  # passes whose not acting on some graphs is by design: logged, not warned
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.records: list[PassRecord] = []

    def _dump(self, gm: torch.fx.GraphModule, step: int, name: str, when: str) -> None:
        if self.dump_dir is None:
            return
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        (self.dump_dir / f"{step:02d}_{name}_{when}.txt").write_text(gm.print_readable(print_output=False))

    def not_applicable(self, name: str, why: str, seconds: float = 0.0, cause: Exception | None = None) -> None:
        """A pass that was asked for does not act on this graph: one warning saying why (strict: an error)."""
        if self.strict:
            raise StrictModeError(f"flashu pass {name!r} does not apply: {why}") from cause
        if name not in self.expected:
            warn_user(f"flashu pass {name!r} skipped: {why}")
        logger.info("pass %s skipped: %s", name, why)
        self.records.append(PassRecord(name, False, seconds, {}, why))

    def run(self, gm: torch.fx.GraphModule, context: Any, options: Any) -> torch.fx.GraphModule:
        """Run the passes in order on ``gm`` (in place) and return it, its code regenerated once at the end: a
        recompile regenerates every outlined submodule too, so one per pass would cost more than most passes.
        A dump or an observer sees the code of the graph as it is."""
        observer = _OBSERVER.get()
        stale = False
        for step, (name, fn) in enumerate(self.passes):
            self._dump(gm, step, name, "before")
            if observer is not None:
                observer(name, "before", gm, context, None)
            start = time.perf_counter()
            before = _Snapshot(gm, context)
            try:
                result = fn(gm, context, options)
            except Exception as error:
                # Whatever the pass changed before it stopped is undone: later passes and the lowering
                # see the graph (and index) as they were.
                before.restore(gm, context)
                if isinstance(error, ValueError):
                    raise  # bad options or plan (the project's input errors are ValueErrors): the user must see it
                if isinstance(error, PassNotApplicable):
                    self.not_applicable(name, str(error), time.perf_counter() - start, cause=error)
                else:
                    if self.strict:
                        raise  # a pass's own bug, as it is: its type and traceback say most
                    why = f"failed with {type(error).__name__}: {error}"
                    warn_user(f"flashu pass {name!r} {why}; the graph continues without it")
                    logger.info("pass %s skipped: %s", name, why)
                    self.records.append(PassRecord(name, False, time.perf_counter() - start, {}, why))
                if observer is not None:
                    observer(name, "after", gm, context, self.records[-1])
                continue
            if result.changed:
                gm.graph.lint()
                stale = True
            if stale and (observer is not None or self.dump_dir is not None):
                gm.recompile()
                stale = False
            self.records.append(PassRecord(name, result.changed, time.perf_counter() - start, result.stats))
            logger.debug("pass %s %s in %.3f s: %s", name, "rewrote the graph" if result.changed else "changed nothing",
                          self.records[-1].seconds, result.stats)
            self._dump(gm, step, name, "after")
            if observer is not None:
                observer(name, "after", gm, context, self.records[-1])
        if stale:
            gm.recompile()
        return gm


class _Snapshot:
    """A graph module's graph, attribute names and (for a :class:`PassContext`) structure index before a pass.

    The graph is a copy; the index is remapped onto the copy's nodes, since a pass may have rewired
    the original's nodes (and the index with them) before it failed. Attributes are not copied: a pass
    only adds new ones (outlined regions, sliced weights), which a restore removes.
    """

    def __init__(self, gm: torch.fx.GraphModule, context: Any) -> None:
        self.nodes: dict[torch.fx.Node, torch.fx.Node] = {}
        self.graph = torch.fx.Graph()
        self.graph.output(self.graph.graph_copy(gm.graph, self.nodes))
        for node, copy in self.nodes.items():
            if hasattr(node, "_dynamo_source"):  # Inductor reads dynamo's graph inputs' sources from the nodes
                copy._dynamo_source = node._dynamo_source
        self.names = {kind: set(getattr(gm, kind)) for kind in _ATTRIBUTE_KINDS}
        index = getattr(context, "index", None)
        self.index = index.remap(self.nodes) if isinstance(index, StructureIndex) else None

    def restore(self, gm: torch.fx.GraphModule, context: Any) -> None:
        for kind, names in self.names.items():
            for name in set(getattr(gm, kind)) - names:
                delattr(gm, name)
        gm.graph = self.graph
        gm.recompile()
        if self.index is not None:
            context.index = self.index


_ATTRIBUTE_KINDS = ("_modules", "_parameters", "_buffers")
