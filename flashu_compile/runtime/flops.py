"""FLOPs of compiled programs, counted where dynamo lets a dispatch mode run.

``torch.compile`` refuses to run a frame while a non-infrastructure ``TorchDispatchMode`` such
as ``FlopCounterMode`` is active (it falls back to eager, which would count the unrewritten
model). So counting happens one level down: inside ``with FlopTally() as tally:`` every flashu
program enters a counting mode (``torch.utils.flop_counter``'s formulas) around its own
call, after dynamo's guards, and adds the result to the tally. The count is exact for the
``eager`` lowering (each rewritten graph node is a dispatched op); Inductor kernels bypass the
dispatcher, so count on ``eager``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

_ACTIVE: ContextVar[FlopTally | None] = ContextVar("flashu_flop_tally", default=None)


class _CountFlops(TorchDispatchMode):
    """``FlopCounterMode``'s formulas without its module tracker, whose hooks fail on parameters
    passed into submodules under ``no_grad`` (as an outlined graph region receives them)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


class FlopTally:
    """Sum of the FLOPs of every counted call made while it is active."""

    def __init__(self) -> None:
        self.total = 0
        self.calls = 0
        self._token = None

    def __enter__(self) -> FlopTally:
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.reset(self._token)

    def record(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        with _CountFlops() as mode:
            out = fn(*args, **kwargs)
        self.total += mode.total
        self.calls += 1
        return out


def active_tally() -> FlopTally | None:
    return _ACTIVE.get()


def call_counted(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``, recording its FLOPs into the active tally, if any."""
    tally = active_tally()
    return tally.record(fn, *args, **kwargs) if tally is not None else fn(*args, **kwargs)


def counted(fn: Callable) -> Callable:
    """``fn`` recording into the active tally, if any (every flashu program; eager baselines alike)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        return call_counted(fn, *args, **kwargs)

    return run
