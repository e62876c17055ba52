"""The request a compiled graph is serving: which task, which model call out of how many.

Samplers open a request and advance its step; compiled programs read it at call time from
Python, outside any traced code, so changing the step never invalidates a dynamo guard and
never recompiles. Everything a program remembers between steps (skip set, head cache) lives
in the request's scratch space, so it is dropped when the request ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

TASKS = ("t2i", "mmu")


@dataclass
class Request:
    task: str
    calls: int  # model calls in this request (t2i: grid points - 1)
    step: int = 0  # 1-based index of the current model call; 0 before the first
    scratch: dict[Any, Any] = field(default_factory=dict)  # state of the compiled programs serving it

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"request task must be one of {list(TASKS)}, got {self.task!r}")
        if self.calls < 1:
            raise ValueError(f"a request needs at least one model call, got {self.calls}")

    def advance(self) -> int:
        """Move to the next model call and return its 1-based index."""
        if self.step >= self.calls:
            raise RuntimeError(f"request already made its {self.calls} model calls")
        self.step += 1
        return self.step


_CURRENT: ContextVar[Request | None] = ContextVar("flashu_request", default=None)


def current_request() -> Request | None:
    return _CURRENT.get()


@contextlib.contextmanager
def request(task: str, calls: int) -> Iterator[Request]:
    """Serve one request; nested requests shadow the outer one until they end."""
    req = Request(task, calls)
    token = _CURRENT.set(req)
    try:
        yield req
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def outside_requests() -> Iterator[None]:
    """Run code (e.g. a compilation on fake inputs) as if no request were open."""
    token = _CURRENT.set(None)
    try:
        yield
    finally:
        _CURRENT.reset(token)
