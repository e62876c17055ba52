"""The torch internals flashu relies on beyond torch's public API, in one place.

Dynamo's tracing context, fake tensors and the FX fuser are private and move between releases.
Everything in the package reaches them through this module, which checks at import that the
installed torch still offers what the callers use, so an unsupported release fails here with
its version and the missing piece named, not deep inside a compilation. Supporting a new torch
release means making :func:`missing_internals` come back empty for it (tests/graph/test_compat.py).

What callers rely on:
- ``TracingContext.try_get()``, the context of the compilation in progress (None outside one), with
  ``fake_mode`` and ``tensor_to_context`` (the symbolic context dynamo recorded per input tensor);
- ``FakeTensorMode.from_tensor(tensor, symbolic_context=...)``, remaking a fake with dynamo's symbols;
- ``detect_fake_mode(values)``, the fake mode of fake values;
- ``tracing(TracingContext(FakeTensorMode(shape_env=ShapeEnv())))`` and ``from_tensor(static_shapes=True)``:
  a compilation context of flashu's own, for a piece compiled after dynamo's has closed;
- ``fuse_as_graphmodule(gm, nodes, name, always_return_tuple=...)`` -> (submodule, inputs, outputs),
  and ``topo_sort(nodes)``;
- ``ShapeEnv``'s ``guards``, ``deferred_runtime_asserts``, ``replacements`` and ``var_to_range``: what a
  compile assumed about its symbols (:func:`shape_assumptions`);
- ``ShortenTraceback``: an exception of this type raised by a backend reaches the caller of the
  compiled function as it is, where dynamo wraps any other in ``BackendCompilerFailed``
  (tests/test_backend.py checks that the library's errors arrive by their own names).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

import torch
from torch._dynamo.exc import ShortenTraceback
from torch._guards import TracingContext, detect_fake_mode, tracing
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.fx.passes.utils.fuser_utils import fuse_as_graphmodule, topo_sort

__all__ = ["FakeTensor", "FakeTensorMode", "ShapeEnv", "ShortenTraceback", "TracingContext", "detect_fake_mode",
           "fuse_as_graphmodule", "missing_internals", "shape_assumptions",
           "symbol_ranges", "topo_sort", "tracing"]


def _accepts(fn, parameter: str) -> bool:
    return parameter in inspect.signature(fn).parameters


def missing_internals() -> list[str]:
    """What of the internals listed in this module's docstring the installed torch lacks (empty: all present)."""
    context, shapes = TracingContext(None), ShapeEnv()
    checks = {
        "TracingContext.try_get": hasattr(TracingContext, "try_get"),
        "TracingContext.fake_mode": hasattr(context, "fake_mode"),
        "TracingContext.tensor_to_context": hasattr(context, "tensor_to_context"),
        "FakeTensorMode.from_tensor(symbolic_context=)": _accepts(FakeTensorMode.from_tensor, "symbolic_context"),
        "FakeTensorMode.from_tensor(static_shapes=)": _accepts(FakeTensorMode.from_tensor, "static_shapes"),
        "FakeTensorMode(shape_env=)": _accepts(FakeTensorMode.__init__, "shape_env"),
        "fuse_as_graphmodule(always_return_tuple=)": _accepts(fuse_as_graphmodule, "always_return_tuple"),
        **{f"ShapeEnv.{name}": hasattr(shapes, name) for name in _ASSUMPTIONS},
    }
    return [name for name, present in checks.items() if not present]


_ASSUMPTIONS = ("guards", "deferred_runtime_asserts", "replacements", "var_to_range")


def shape_assumptions(shape_env: ShapeEnv | None, symbols: Iterable | None = None) -> tuple:
    """What ``shape_env`` assumes about ``symbols`` (all its symbols when None), as far as a compile can change it:
    compared before and after one, a difference means the compiled code holds only under some guard, runtime
    assertion, replacement or narrower value range that nothing checks unless a caller installs it."""
    if shape_env is None:
        return ()
    return (len(shape_env.guards), sum(map(len, shape_env.deferred_runtime_asserts.values())),
            len(shape_env.replacements), symbol_ranges(shape_env, symbols))


def symbol_ranges(shape_env: ShapeEnv | None, symbols: Iterable | None = None) -> tuple:
    """The value ranges ``shape_env`` gives ``symbols`` (all its symbols, in name order, when None), as text."""
    if shape_env is None:
        return ()
    ranges = shape_env.var_to_range
    return tuple(str(ranges.get(symbol)) for symbol in (sorted(ranges, key=str) if symbols is None else symbols))


if _missing := missing_internals():
    raise ImportError(f"flashu_compile does not support torch {torch.__version__}: it lacks {', '.join(_missing)}")
