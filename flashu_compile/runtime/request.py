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
- with no request open, a program call joins an implicit request of its task and thread,
  which :func:`serving` picks, starts and advances from what the call's inputs show (see there).

Requests are told apart by what they compute, not only by the step: a denoising call carries its
conditioning (text rows, attention mask, span positions), and an implicit request belongs to one
conditioning. Two prompts' loops interleaved in one thread so each get a request of their own,
and a loop that stops early cannot lend its state to the next prompt's loop.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..validate import warn_user

TASKS = ("t2i", "mmu")
# How one program call relates to the calls before it: the first of a request, the first of a new
# step, or another call of the same step (the same flow time again).
Boundary = Literal["start", "step", "same"]
# Implicit requests kept per task and thread: each holds its programs' caches until it is pushed out by
# newer ones (a loop that comes back after more than this many others were served starts anew).
MAX_IMPLICIT = 8
Conditioning = tuple[torch.Tensor, ...]


@dataclass
class Request:
    task: str
    calls: int | None  # model calls in this request (t2i: grid points - 1); None: not known
    step: int = 0  # 1-based index of the current model call; 0 before the first
    scratch: dict[Any, Any] = field(default_factory=dict)  # state of the compiled programs serving it
    auto: bool = False  # the programs advance it, not the caller
    time: float | None = None  # the flow time of the latest denoising call (where an auto request tells steps apart)
    conditioning: Conditioning | None = None  # a copy of the conditioning its denoising calls were given

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"request task must be one of {list(TASKS)}, got {self.task!r}")
        if self.calls is not None and (isinstance(self.calls, bool) or not isinstance(self.calls, int)
                                       or self.calls < 1):
            raise ValueError(f"a request needs a whole number of model calls >= 1 (or None), got {self.calls!r}")

    def advance(self) -> int:
        """Move to the next model call and return its 1-based index."""
        if self.calls is not None and self.step >= self.calls:
            raise RuntimeError(f"this is model call {self.step + 1} of a request declared with calls={self.calls}: "
                               "calls counts model calls (a text-to-image loop over S grid points makes S - 1; an "
                               "answer of T tokens makes T); declare the number the loop makes")
        self.step += 1
        return self.step

    def restart(self) -> None:
        """Begin again at step 0 with nothing remembered (a user's loop started its next image)."""
        self.step = 0
        self.scratch.clear()


# The open requests, innermost last. A stack rather than one value reset by tokens: contexts that two
# interleaved loops (generators) enter and leave out of order must still all be gone once they are left.
_CURRENT: ContextVar[tuple[Request, ...]] = ContextVar("flashu_request", default=())


def current_request() -> Request | None:
    stack = _CURRENT.get()
    return stack[-1] if stack else None


@contextlib.contextmanager
def _opened(req: Request) -> Iterator[list[bool]]:
    """``req`` current inside; yields a flag the exit reads: whether another request was current when it ended."""
    _CURRENT.set((*_CURRENT.get(), req))
    crossed = [False]
    try:
        yield crossed
    finally:
        stack = _CURRENT.get()
        crossed[0] = not stack or stack[-1] is not req
        # Its own entry only: a program call serving an open request pushed that request once more.
        last = max((i for i, r in enumerate(stack) if r is req), default=None)
        _CURRENT.set(stack if last is None else stack[:last] + stack[last + 1:])


@contextlib.contextmanager
def request(task: str, calls: int | None = None, *, auto: bool = False) -> Iterator[Request]:
    """Serve one request of ``task`` ("t2i" or "mmu") of ``calls`` model calls; nested requests shadow outer ones.

    The caller advances it before each model call, unless ``auto``: see :func:`auto_request`.
    """
    req = Request(task, calls, auto=auto)
    with _opened(req) as crossed:
        yield req
    # Contexts entered in turn by two interleaved loops (generators, say) leave another one current here:
    # their calls were served by each other's request.
    if crossed[0]:
        raise RuntimeError(f"flashu_compile.request({task!r}) contexts were interleaved: another request was current "
                           "when this one ended, so their model calls were served by each other's state. Finish one "
                           "request's loop before the next begins, or run the loops without a request context")
    if auto and calls is not None and 0 < req.step < calls:
        # Fewer calls than declared: the final phase, counted back from the declared end, came late or never.
        warn_user(f"flashu_compile.request({task!r}, calls={calls}) ended after {req.step} model call(s): calls "
                  "counts model calls (a text-to-image loop over S grid points makes S - 1), and the final "
                  f"full-network phase counts back from it; declare calls={req.step}")


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
        self.requests: dict[str, list[Request]] = {}  # per task, the most recently served first
        self.warned_restart = False


_IMPLICIT = _Implicit()


def _rows_relation(kept: Conditioning | None, given: Conditioning) -> Literal["same", "rows"] | None:
    """How a call's conditioning relates to a request's: the same tensors, the leading rows of one another (the
    conditional rows alone, as when guidance switches off, or the whole batch again), or neither."""
    if kept is None or len(kept) != len(given):
        return None
    relation: Literal["same", "rows"] = "same"
    for old, new in zip(kept, given, strict=True):
        if old.dtype != new.dtype or old.device != new.device or old.dim() != new.dim():
            return None
        if old.shape == new.shape:
            if not torch.equal(old, new):
                return None
            continue
        if old.dim() == 0 or old.shape[1:] != new.shape[1:]:
            return None
        n = min(old.shape[0], new.shape[0])
        if not torch.equal(old[:n], new[:n]):
            return None
        relation = "rows"
    return relation


def _snapshot(conditioning: Conditioning) -> Conditioning:
    return tuple(c.detach().clone() for c in conditioning)


Relation = Callable[[Request], Literal["same", "rows"] | None]


def _implicit(task: str, time: float | None, conditioning: Conditioning | None, relation: Relation) -> Request:
    """The implicit request of ``task`` in this thread that a call with this conditioning continues, or a new one."""
    requests = _IMPLICIT.requests.setdefault(task, [])
    if conditioning is not None:
        for i, req in enumerate(requests):
            if relation(req) == "same":
                requests.insert(0, requests.pop(i))
                return req
        # The latest request's rows with their batch changed at a later t: the same request with guidance
        # switched off (or on again).
        if (requests and time is not None and requests[0].time is not None and time > requests[0].time
                and relation(requests[0]) == "rows"):
            return requests[0]
    elif requests:
        # A graph whose inputs show no conditioning: its calls are told apart by t alone.
        return requests[0]
    req = Request(task, None, auto=True)
    requests.insert(0, req)
    del requests[MAX_IMPLICIT:]
    return req


def _boundary(req: Request, starts: bool | None, time: float | None, conditioning: Conditioning | None,
              relation: Relation) -> Boundary:
    if time is None:
        return "start" if starts else "step"
    # Flow time grows from 0 to 1 over a request: a call at an earlier t begins the next one.
    last, req.time = req.time, time
    if conditioning is None:
        # Nothing else to tell by: the same t is another call of the same step.
        return "start" if last is None or time < last else ("same" if time == last else "step")
    related = relation(req)
    if last is None or time < last:
        boundary: Boundary = "start"
    elif related is None:
        raise RuntimeError(
            f"flashu: a denoising call at t={time:g} was given other prompts (text rows, attention mask or span "
            f"positions) than the earlier calls of its flashu_compile.request({req.task!r}) at t={last:g}: two "
            "requests are interleaved in one request context. Give each loop its own flashu_compile.request "
            "and finish it before the next one starts, or run the loops without a request context (each "
            "prompt then gets a request of its own)")
    elif time == last:
        if related != "same":
            raise RuntimeError(f"flashu: two denoising calls at the same t={time:g} in one flashu_compile.request "
                               "were given different rows; send a step's rows in one call")
        # The same prompt again at the same t: most likely a new request (another seed). The caches are exact to
        # drop, so it starts anew; only the request context can say otherwise.
        if not _IMPLICIT.warned_restart:
            _IMPLICIT.warned_restart = True
            warn_user(f"flashu: a denoising call repeated t={time:g} with the same prompts, so it is taken as a "
                      "new request of the same prompts; if it continues the same request, run the loop inside "
                      f"flashu_compile.request({req.task!r}, calls=N)")
        boundary = "start"
    else:
        boundary = "step"
    if boundary == "start" or (related == "rows" and conditioning[0].shape[0] > req.conditioning[0].shape[0]):
        req.conditioning = _snapshot(conditioning)  # kept whole: both batch sizes are matched against it
    return boundary


@contextlib.contextmanager
def serving(task: str, *, starts: bool | None = None, time: float | None = None,
            conditioning: Conditioning | None = None) -> Iterator[Request | None]:
    """The request one program call of ``task`` serves, moved on to this call and current during it.

    What the call's inputs show: ``time``, a denoising step's flow time, with its ``conditioning``
    (the text rows, attention mask and span positions it was given), or ``starts``, whether the
    call begins a request (a prefill, or a forward without a KV cache) rather than continuing one
    (a decode step). An explicit request the caller advances is used as it is. Of the open
    ``auto`` requests, the one holding the call's conditioning serves it (else the innermost): it
    is advanced, and restarted when the inputs show a new request began (an earlier t, or the same
    t and prompts again); other prompts at a later t inside one are two interleaved requests, an
    error. With no request open, the call joins the implicit request of its task
    in this thread that holds its conditioning (or a new one). A request of another task is left
    alone: the program then runs its full network, as it does outside any request.
    """
    compared: dict[int, Literal["same", "rows"] | None] = {}

    def relation(held: Request) -> Literal["same", "rows"] | None:
        # Each request's conditioning is compared with the call's once per call (a hot path: every model call).
        if id(held) not in compared:
            compared[id(held)] = _rows_relation(held.conditioning, conditioning)
        return compared[id(held)]

    req = current_request()
    if req is None:
        req = _implicit(task, time, conditioning, relation)
    elif not req.auto or req.task != task:
        if req.task == task and time is not None:
            req.time = time  # the caller steps it; what the call's t is, guards may still ask (a forecast)
        yield req
        return
    elif conditioning is not None:
        # Loops each inside their own request context but interleaved (generators) leave the innermost context
        # current for all of them: a call belongs to the open request that holds its conditioning.
        req = next((r for r in reversed(_CURRENT.get()) if r.auto and r.task == task and relation(r) is not None),
                   req)
    boundary = _boundary(req, starts, time, conditioning, relation)
    if boundary == "start" and req.step:
        req.restart()
    if boundary != "same" or not req.step:
        req.advance()
    with _opened(req):
        yield req


def end_implicit_requests() -> None:
    """Forget this thread's implicit requests and what it was told (tests, or a server between unrelated users)."""
    _IMPLICIT.requests.clear()
    _IMPLICIT.warned_restart = False
