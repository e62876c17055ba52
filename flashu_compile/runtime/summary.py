"""What a compiled model did: ``with flashu_compile.summary() as done: ...`` then ``print(done)``.

Built on the request timeline (:mod:`runtime.timeline`) and the FLOP tally (:mod:`runtime.flops`):
every call of a flashu program inside the block is recorded, and the records are grouped into
requests (a request's calls count up from 1; a call at step 1 begins the next). Per request: its
task, how many model calls ran in which phase, the layers skipped, what the head cache and the
text-prefix memo did, and the FLOPs of its calls.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from .flops import FlopTally
from .timeline import CallRecord, record_calls


@dataclass
class RequestSummary:
    """One request: its ``task``, its program calls' records in order, and their FLOPs."""

    task: str
    calls: list[CallRecord] = field(default_factory=list)

    @property
    def phases(self) -> Counter:
        """Calls per phase: "rewritten", "full" (the final hybrid phase), "specialized", "outside"."""
        return Counter(c.phase for c in self.calls)

    @property
    def skipped(self) -> Counter:
        """How many calls skipped each set of layers (the empty set: none skipped)."""
        return Counter(c.skipped for c in self.calls)

    @property
    def cache(self) -> Counter:
        """What the memoized regions did over the request: "store", "reuse", "compute", "prefix store", ..."""
        return Counter(a for c in self.calls for a in c.actions)

    @property
    def flops(self) -> int:
        return sum(c.flops or 0 for c in self.calls)

    def line(self) -> str:
        phases = ", ".join(f"{n} {p}" for p, n in sorted(self.phases.items()))
        skipped = "; ".join(f"{n} call(s) skip {list(s)}" for s, n in sorted(self.skipped.items()) if s) or "none"
        cache = ", ".join(f"{a} x{n}" for a, n in sorted(self.cache.items())) or "-"
        line = (f"{self.task:<4} {len(self.calls):>5} calls ({phases}) | layers skipped: {skipped} | "
                f"cache: {cache} | " + (f"{self.flops / 1e6:,.1f} MFLOP" if self.counted else "FLOPs not counted"))
        if self.unplaced_final:
            line += (f" | no final full-network phase: the request's length was not given "
                     f"(flashu_compile.request({self.task!r}, calls=N)), so it ran faster and less exact than asked")
        return line

    @property
    def unplaced_final(self) -> bool:
        """Whether its final full-network phase was left out because nothing said how many calls it makes."""
        return any(c.unplaced_final for c in self.calls)

    @property
    def counted(self) -> bool:
        """Whether its calls' FLOPs were counted (a :func:`summary` with ``flops=True``)."""
        return any(c.flops is not None for c in self.calls)


@dataclass
class Summary:
    """The requests served inside a :func:`summary` block, in order; printed as a table."""

    requests: list[RequestSummary] = field(default_factory=list)

    @property
    def flops(self) -> int:
        return sum(r.flops for r in self.requests)

    def totals(self) -> list[str]:
        """One line per task, its requests taken together (a long run's summary, where a row per request is too
        many): the requests, then the calls as :meth:`RequestSummary.line` counts them."""
        lines = []
        for task in dict.fromkeys(r.task for r in self.requests):
            mine = [r for r in self.requests if r.task == task]
            merged = RequestSummary(task, [c for r in mine for c in r.calls])
            lines.append(f"{len(mine)} request(s): {merged.line()}")
        return lines

    def __str__(self) -> str:
        if not self.requests:
            return "flashu: no compiled flashu program served a request"
        rows = [f"  {i}. {r.line()}" for i, r in enumerate(self.requests, start=1)]
        return "\n".join([f"flashu: {len(self.requests)} request(s), {self.flops / 1e6:,.1f} MFLOP", *rows])


def group(records: list[CallRecord]) -> list[RequestSummary]:
    """Records in call order -> requests: a task's calls count up from step 1, so a call at an earlier step than
    its task's last (or outside any request, step 0) begins the next request. (Two requests of one call each in
    a row read as one.)"""
    out: list[RequestSummary] = []
    open_: dict[str, RequestSummary] = {}
    for record in records:
        current = open_.get(record.task)
        if current is None or record.step == 0 or record.step < current.calls[-1].step:
            current = open_[record.task] = RequestSummary(record.task)
            out.append(current)
        current.calls.append(record)
    return out


@contextlib.contextmanager
def summary(flops: bool = True) -> Iterator[Summary]:
    """Record what every compiled flashu program does inside the block; the yielded :class:`Summary` is filled
    when the block ends. Costs a FLOP count per call while active (nothing outside a block); ``flops=False``
    leaves the FLOPs out (0) and costs next to nothing."""
    done = Summary()
    with FlopTally() if flops else contextlib.nullcontext(), record_calls() as records:
        try:
            yield done
        finally:
            done.requests = group(records)
