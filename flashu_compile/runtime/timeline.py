"""A request's timeline: what each call of a compiled flashu program decided and computed.

Inside ``with record_calls() as calls:`` every call of a flashu program that serves a request
appends one :class:`CallRecord`: the request's step, the phase it ran in, the layers it skipped,
what its memoized regions did (head cache or text prefix: store, reuse or compute) and, when a
:class:`~flashu_compile.runtime.flops.FlopTally` is active too, the FLOPs of that call. Nothing is
recorded (and nothing is paid) when no recording is active. graph-diff draws these records as
the request timeline of its HTML page.

Invariant: one record per program call, in call order, each filled from the same step state the
guard ops read during that call, so the picture shows what ran rather than what the rules predict.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

from .flops import active_tally

# "rewritten": the pass-rewritten graph; "full": the unrewritten graph of the final hybrid_tau calls;
# "specialized": a guard-free graph for a settled skip set; "outside": no request of this task was open.
PHASES = ("rewritten", "full", "specialized", "outside")


@dataclass(frozen=True)
class CallRecord:
    """One program call: ``step`` is the request's 1-based model call (0 outside a request)."""

    task: str
    step: int
    phase: str
    skipped: tuple[int, ...]  # layers the call skipped (none while importance was measured)
    measured: bool  # whether this call measured layer importance (it ran every layer)
    actions: tuple[str, ...]  # what its memoized regions did: "store", "reuse", "compute", "prefix store", ...
    flops: int | None  # None when no FlopTally was active
    # A call of a graph with a final full-network phase in a request whose length nobody gave: that phase
    # could not be placed, so the request runs without it (faster and less exact than its options ask).
    unplaced_final: bool = False

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {list(PHASES)}, got {self.phase!r}")


_ACTIVE: ContextVar[list[CallRecord] | None] = ContextVar("flashu_timeline", default=None)


@contextlib.contextmanager
def record_calls() -> Iterator[list[CallRecord]]:
    """Collect a :class:`CallRecord` per flashu program call made inside the block (nested blocks each get theirs)."""
    records: list[CallRecord] = []
    token = _ACTIVE.set(records)
    try:
        yield records
    finally:
        _ACTIVE.reset(token)


def recording() -> bool:
    return _ACTIVE.get() is not None


class CallWatch:
    """Taken just before a program call and closed just after it: the call's FLOPs and state changes.

    ``history`` is the step state's action list (guards append to it during the call), so the
    actions of this call are the entries added while it ran.
    """

    def __init__(self, history: list[tuple[int, str]] | None) -> None:
        tally = active_tally()
        self._tally, self._flops = tally, tally.total if tally is not None else 0
        self._history, self._seen = history, len(history) if history is not None else 0

    def close(self, task: str, step: int, phase: str, skipped: frozenset[int], measured: bool,
              unplaced_final: bool = False) -> None:
        records = _ACTIVE.get()
        if records is None:
            return
        actions = tuple(a for _, a in self._history[self._seen:]) if self._history is not None else ()
        flops = self._tally.total - self._flops if self._tally is not None else None
        records.append(CallRecord(task, step, phase, tuple(sorted(skipped)), measured, actions, flops,
                                  unplaced_final))
