"""Guard-free decode graphs, one per settled skip set, compiled on first use and kept in a bounded cache.

The guarded graph stays the program of record: it serves every step whose decisions may still
change, and any skip set whose specialization cannot be built or compiled (with a warning). A
specialization must serve every cache length the graph it comes from serves, so it is compiled
for symbolic sizes: on the symbolic inputs of that graph's trace (the placeholders' fake values),
kept only if compiling it assumed nothing about their sizes (no guard, runtime assertion,
replacement or narrowed range). It then serves every call the trace's guards admit, which are the
only calls that reach it. Otherwise it goes through dynamo with dynamic sizes, which guards it
like any other compiled frame (a call it does not fit recompiles rather than computing something
wrong), at the price of tracing the graph again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from ..graph.compat import detect_fake_mode
from ..graph.specialize import resolve_layer_guards
from ..runtime.compile_profile import phase
from ..validate import warn_user
from .segmented import compile_on_trace, lower


class Specializations:
    def __init__(self, gm: torch.fx.GraphModule, lowering: str, capacity: int, guarded: Callable) -> None:
        self.gm, self.lowering, self.capacity, self.guarded = gm, lowering, capacity, guarded
        self.programs: OrderedDict[frozenset[int], Callable] = OrderedDict()
        self.built = 0  # specializations made (evicted ones included): for tests and reports

    def get(self, skip: frozenset[int]) -> Callable:
        """The program for ``skip``, most recently used last; the least recently used one leaves when full."""
        program = self.programs.pop(skip, None)
        if program is None:
            program = self._build(skip)
            while len(self.programs) >= self.capacity:
                self.programs.popitem(last=False)
        self.programs[skip] = program
        return program

    def _build(self, skip: frozenset[int]) -> Callable:
        self.built += 1
        with phase("specialization: guards resolved"):
            gm = resolve_layer_guards(self.gm, skip)
        if gm is None:
            return self.guarded
        if self.lowering == "eager":
            return gm.forward
        try:
            compiled = self._on_trace_symbols(gm)
        except Exception as error:  # any compile failure has the same remedy
            _warn_guarded_runs(error, skip)
            return self.guarded
        if compiled is not None:
            return compiled
        return _FirstCallFallback(torch.compile(gm, backend=self._lower, dynamic=True), self.guarded, skip)

    def _on_trace_symbols(self, gm: torch.fx.GraphModule) -> Callable | None:
        """``gm`` lowered on its trace's fake inputs, or None if that compile assumed something of their sizes."""
        fakes = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        fake_mode = detect_fake_mode(fakes)
        if fake_mode is None or fake_mode.shape_env is None or any(v is None for v in fakes):
            return None
        compiled = []
        return compiled[0] if compile_on_trace(fakes, lambda: compiled.append(self._lower(gm, fakes))) else None

    def _lower(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        with phase("lowering specialization"):
            return lower(gm, example_inputs, self.lowering)


class _FirstCallFallback:
    """A compiled specialization; if its first call (the compilation) fails, the guarded graph serves instead."""

    def __init__(self, compiled: Callable, guarded: Callable, skip: frozenset[int]) -> None:
        self.fn, self.guarded, self.skip, self.tried = compiled, guarded, skip, False

    def __call__(self, *args: Any) -> Any:
        if self.tried:
            return self.fn(*args)
        try:
            out = self.fn(*args)
        except Exception as error:  # any compile failure has the same remedy
            _warn_guarded_runs(error, self.skip)
            self.fn = self.guarded
            out = self.fn(*args)
        self.tried = True
        return out


def _warn_guarded_runs(error: Exception, skip: frozenset[int]) -> None:
    cause = getattr(error, "inner_exception", None) or error  # dynamo wraps the lowering's own error
    warn_user(f"compiling the decode graph specialized on skip set {sorted(skip)} failed "
              f"({type(cause).__name__}: {cause}); the guarded graph runs")
