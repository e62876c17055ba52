"""The request a compiled graph is serving: which task, which model call out of how many.

Compiled programs read the request at call time from Python, outside any traced code, so
changing the step never invalidates a dynamo guard and never recompiles. Everything a program
remembers between steps (skip set, head cache) lives in the request's scratch space, so it is
dropped when the request ends.

A request comes from one of three places:

- the project's samplers open one with ``request(task, calls)`` and advance it before each
  model call themselves;
- a user's own loop can run inside the public ``flashu_compile.request(task, calls)``
  (:func:`auto_request`): the programs advance it, and ``calls`` gives what no input shows,
  the request's length, which the final full-network phase (``hybrid_tau``) needs;
- with no request open, a program call joins an implicit one per task and thread, which
  :func:`serving` starts and advances from what the call's inputs show (see there).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

TASKS = ("t2i", "mmu")
# How one program call relates to the calls before it: the first of a request, the first of a new
# step, or another call of the same step (the same flow time again).
Boundary = Literal["start", "step", "same"]


@dataclass
class Request:
    task: str
    calls: int | None  # model calls in this request (t2i: grid points - 1); None: not known
    step: int = 0  # 1-based index of the current model call; 0 before the first
    scratch: dict[Any, Any] = field(default_factory=dict)  # state of the compiled programs serving it
    auto: bool = False  # the programs advance it, not the caller
    time: float | None = None  # the flow time of the latest denoising call (where an auto request tells steps apart)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"request task must be one of {list(TASKS)}, got {self.task!r}")
        if self.calls is not None and (isinstance(self.calls, bool) or not isinstance(self.calls, int)
                                       or self.calls < 1):
            raise ValueError(f"a request needs a whole number of model calls >= 1 (or None), got {self.calls!r}")

    def advance(self) -> int:
        """Move to the next model call and return its 1-based index."""
        if self.calls is not None and self.step >= self.calls:
            raise RuntimeError(f"request already made its {self.calls} model calls")
        self.step += 1
        return self.step

    def restart(self) -> None:
        """Begin again at step 0 with nothing remembered (a user's loop started its next image)."""
        self.step = 0
        self.scratch.clear()


_CURRENT: ContextVar[Request | None] = ContextVar("flashu_request", default=None)


def current_request() -> Request | None:
    return _CURRENT.get()


@contextlib.contextmanager
def request(task: str, calls: int | None = None, *, auto: bool = False) -> Iterator[Request]:
    """Serve one request of ``task`` ("t2i" or "mmu") of ``calls`` model calls; nested requests shadow outer ones.

    The caller advances it before each model call, unless ``auto``: see :func:`auto_request`.
    """
    req = Request(task, calls, auto=auto)
    token = _CURRENT.set(req)
    try:
        yield req
    finally:
        _CURRENT.reset(token)


def auto_request(task: str, calls: int | None = None) -> contextlib.AbstractContextManager[Request]:
    """``flashu_compile.request``: a user's own loop of ``calls`` model calls of ``task`` runs inside it.

    Every call of a compiled flashu program of this task moves the request on by itself (each new
    ``t`` of a denoising step, each prefill or decode step), so nothing in the loop changes. It is
    needed only for what no input shows: the request's length, which the final full-network phase
    (``hybrid_tau``) counts back from. A text-to-image loop over 50 grid points makes ``calls=49``.
    """
    return request(task, calls, auto=True)


class _Implicit(threading.local):
    def __init__(self) -> None:
        self.requests: dict[str, Request] = {}


_IMPLICIT = _Implicit()


def _boundary(req: Request, starts: bool | None, time: float | None) -> Boundary:
    if time is not None:
        # Flow time grows from 0 to 1 over a request: a call at an earlier t begins the next one, the same t
        # is another call of the same step.
        last, req.time = req.time, time
        return "start" if last is None or time < last else ("same" if time == last else "step")
    return "start" if starts else "step"


@contextlib.contextmanager
def serving(task: str, *, starts: bool | None = None, time: float | None = None) -> Iterator[Request | None]:
    """The request one program call of ``task`` serves, moved on to this call and current during it.

    What the call's inputs show: ``time``, a denoising step's flow time, or ``starts``, whether the
    call begins a request (a prefill, or a forward without a KV cache) rather than continuing one
    (a decode step). An explicit request the caller advances is used as it is. An ``auto``
    request is advanced, and restarted when the inputs show a new request began. With no request
    open, the call joins the implicit request of its task in this thread, started anew where the
    inputs say so. A request of another task is left alone: the program then runs its full
    network, as it does outside any request.
    """
    req = current_request()
    if req is None:
        req = _IMPLICIT.requests.get(task)
        if req is None:
            req = _IMPLICIT.requests[task] = Request(task, None, auto=True)
    elif not req.auto or req.task != task:
        yield req
        return
    boundary = _boundary(req, starts, time)
    if boundary == "start" and req.step:
        req.restart()
    if boundary != "same" or not req.step:
        req.advance()
    token = _CURRENT.set(req)
    try:
        yield req
    finally:
        _CURRENT.reset(token)


def end_implicit_requests() -> None:
    """Forget this thread's implicit requests (tests, or a server between unrelated users)."""
    _IMPLICIT.requests.clear()
