"""Lower through TorchInductor, exactly as ``backend="inductor"`` would for the same graph.

With the option ``cudagraphs``, each graph compiled here (a whole graph, or each piece between
the guards) is compiled as ``mode="reduce-overhead"`` would, and replays as CUDA graphs on a GPU.

Dynamo compiles a frame inside its tracing context, whose fake mode carries a shape environment;
Inductor's FX graph cache and AOTAutograd's cache key a graph only with one ("No shape env" is a
bypass). The pieces flashu compiles lazily, on one call's real inputs after dynamo's context has
closed (segments between guards, outlined regions, the full-network graph of a static trace), get
a context of their own with static sizes, so they hit those caches as a plain dynamo graph does:
in a restarted process, and across structurally identical pieces (decoder layers that differ only
in their weights, which are inputs) within one.

Within one process a piece is compiled once per structure: a piece whose graph, input metadata and
settings equal those of a piece some live program still uses reuses that compiled function (see
``_structure_key``), so 28 identical decoder layers cost one compile (or one cache load on a warm
start), not 28. ``forget_compiled_pieces`` makes the next compiles start as a new process would.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch._inductor.config
from torch._dynamo.utils import counters
from torch.utils import _pytree as pytree

from ..graph.compat import (
    FakeTensorMode,
    ShapeEnv,
    TracingContext,
    detect_fake_mode,
    shape_assumptions,
    symbol_ranges,
    tracing,
)
from ..graph.rewrite import copy_graph
from ..validate import warn_user


@dataclass(frozen=True)
class InductorSettings:
    """Inductor settings beyond the defaults ``backend="inductor"`` uses."""

    cudagraphs: bool = False  # replay each compiled piece as CUDA graphs

    @classmethod
    def from_options(cls, options: Any) -> InductorSettings:
        return cls(cudagraphs=options.cudagraphs)

    def config_patches(self) -> dict[str, Any]:
        return {"triton.cudagraphs": True} if self.cudagraphs else {}


def on_cuda(example_inputs: list) -> bool:
    """Whether any tensor input lives on a CUDA device (fake inputs report the device they stand for)."""
    return any(isinstance(x, torch.Tensor) and x.device.type == "cuda" for x in pytree.tree_leaves(example_inputs))


def lower_inductor(gm: torch.fx.GraphModule, example_inputs: list, settings: InductorSettings | None = None
                   ) -> Callable:
    """``gm`` compiled by Inductor; with ``settings.cudagraphs`` on a CUDA graph, as ``mode="reduce-overhead"``
    compiles it (Inductor records and replays it as CUDA graphs), each output returned as a copy.

    Why copies: a recorded graph writes its outputs into the same memory on every replay, and the
    backend's guards keep some outputs across steps (the flow-head cache, the text prefix's keys
    and values). A copy is the caller's own; nothing of the graph's memory stays referenced, so the
    next call replays instead of recording anew. A graph without CUDA inputs compiles as without
    the option, with a warning: CUDA graphs exist only on a GPU.

    Inductor compiles a copy of ``gm``: it may rewrite a graph's output in place, and ``gm`` stays the
    caller's (fake propagation, an eager fallback run it).
    """
    from torch._inductor.compile_fx import compile_fx

    if settings is not None and settings.cudagraphs and not on_cuda(example_inputs):
        warn_user("flashu: option cudagraphs=True is ignored for a graph whose inputs are not on a CUDA device "
                  "(CUDA graphs need a GPU); Inductor compiles it without them")
        settings = None
    patches = settings.config_patches() if settings is not None else {}
    given_fakes = detect_fake_mode(pytree.tree_leaves(example_inputs))
    shape_env = getattr(given_fakes, "shape_env", None)
    # CUDA graphs record per function and treat weights as fixed addresses: such pieces are never shared.
    key, symbols = (None, ()) if patches else _structure_key(gm, example_inputs)
    if key is not None and (shared := _compiled_pieces.get(key)) is not None:
        origin = _origin_of[shared]
        # A piece compiled for symbolic sizes may have left assumptions about its own symbols in its trace's shape
        # environment (guards, narrowed ranges): it serves only pieces of the same trace, and pieces whose sizes
        # are other symbols (another layer's cache length) only if it left none.
        if origin.trace() is shape_env and (symbols == origin.symbols or (
                not origin.assumed and symbol_ranges(shape_env, symbols) == origin.ranges)):
            counters["flashu"]["pieces_shared"] += 1
            return shared
    before = shape_assumptions(shape_env, symbols)
    if given_fakes is not None:
        compiled = compile_fx(copy_graph(gm), example_inputs, config_patches=patches)  # dynamo's context, or fakes
    else:
        fake_mode = FakeTensorMode(shape_env=ShapeEnv())
        # Every tensor, tuples' included, at its static size: no symbol may enter a piece compiled for one shape.
        fakes = pytree.tree_map_only(torch.Tensor, lambda x: fake_mode.from_tensor(x, static_shapes=True),
                                     example_inputs)
        with tracing(TracingContext(fake_mode)):
            compiled = compile_fx(copy_graph(gm), fakes, config_patches=patches)
    if key is not None:
        _compiled_pieces[key] = compiled
        assumed = shape_assumptions(shape_env, symbols) != before
        _origin_of[compiled] = _Origin(weakref.ref(shape_env) if shape_env is not None else lambda: None, symbols,
                                       symbol_ranges(shape_env, symbols), assumed)
    return copied_outputs(compiled) if patches else compiled


@dataclass(frozen=True)
class _Origin:
    """Where a shared piece was compiled: the shape environment its symbolic sizes belong to (None for a static
    piece), its inputs' symbols in the order its structure key names them and their value ranges when it was
    compiled, and whether compiling it added an assumption about them (a guard, a runtime assertion, a
    replacement or a narrower range). Code compiled without an assumption serves any symbols of those ranges."""

    trace: Callable[[], ShapeEnv | None]
    symbols: tuple
    ranges: tuple
    assumed: bool


# The compiled pieces live programs use, by ``_structure_key`` (held weakly: a piece no program uses any more is
# not kept), and where each was compiled.
_compiled_pieces: weakref.WeakValueDictionary[str, Callable] = weakref.WeakValueDictionary()
_origin_of: weakref.WeakKeyDictionary[Callable, _Origin] = weakref.WeakKeyDictionary()


def forget_compiled_pieces() -> None:
    """Compile every later piece as a new process would (from the caches on disk, or from scratch), even where a
    live program already holds one of the same structure: what a benchmark of a first start measures."""
    _compiled_pieces.clear()


_ALIGNMENT = 16  # bytes; Inductor's alignment of input data pointers (torch._inductor.utils.GPU_ALIGN_BYTES)


class _Ref:
    """A node argument in a structure key: the producing node's position in the graph."""

    def __init__(self, position: int) -> None:
        self.position = position

    def __repr__(self) -> str:
        return f"%{self.position}"


def _structure_key(gm: torch.fx.GraphModule, example_inputs: list) -> tuple[str | None, tuple]:
    """What Inductor's output for ``gm`` on ``example_inputs`` depends on, with node names left out, and the
    symbols of the inputs' sizes in the order the key names them; a key of None for a graph that holds
    constants or submodules of its own (``get_attr``, ``call_module``), whose values would be compiled in.

    Equal keys mean the same operations on inputs of the same sizes, strides, alignment, dtypes, devices and
    aliasing (which inputs share storage), under the same Inductor config, grad mode and deterministic-algorithms
    setting: one compiled function serves both graphs, whatever the inputs hold. Decoder layers outlined from
    one model differ only in their node names and weights, which are inputs. Symbolic sizes are named by order
    of appearance, so the decode step's layers, each with its own symbol for its cache length, have equal keys
    (compiled code reads a symbol's value from its input's size at run time; whether the symbols' ranges allow
    sharing is ``lower_inductor``'s to check).
    """
    symbols: dict = {}

    def size(value: Any) -> str:
        if not isinstance(value, torch.SymInt):
            return str(value)
        expr = value.node.expr
        for symbol in sorted(expr.free_symbols, key=str):
            symbols.setdefault(symbol, sympy.Symbol(f"S{len(symbols)}", integer=True))
        return str(expr.xreplace(symbols))

    position: dict[torch.fx.Node, int] = {}
    parts = []
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            return None, ()
        position[node] = len(position)
        if node.op != "placeholder":
            args = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: _Ref(position[n]))
            parts.append(f"{node.op} {node.target!r} {args!r}")
    leaves, spec = pytree.tree_flatten(example_inputs)
    storages: dict[int, int] = {}
    for i, x in enumerate(leaves):
        if isinstance(x, torch.Tensor):
            shared = storages.setdefault(x.untyped_storage()._cdata, i)
            # Not the storage offset itself: compiled code reads an input from its data pointer, offset included,
            # so the pruned FFNs of many layers (views at different offsets of their weights) share a piece.
            # Whether the input is aligned is part of the key: Inductor assumes inputs aligned at compile
            # time stay aligned (and copies one that is not).
            aligned = x.storage_offset() * x.element_size() % _ALIGNMENT == 0
            parts.append(f"tensor {list(map(size, x.shape))} {list(map(size, x.stride()))} aligned {aligned} "
                         f"{x.dtype} {x.device} {x.requires_grad} storage of input {shared}")
        else:
            parts.append(f"{type(x).__name__} {size(x)}")
    parts += [str(spec), torch._inductor.config.get_hash().hex(), f"grad {torch.is_grad_enabled()}",
              f"deterministic {torch.are_deterministic_algorithms_enabled()}"]
    return "\n".join(parts), tuple(symbols)


def copied_outputs(fn: Callable) -> Callable:
    """``fn`` with every tensor of its output replaced by a copy, in ``fn``'s calling convention (Inductor may
    return a "boxed" function, which takes its inputs as one list)."""
    def copy(out: Any) -> Any:
        return pytree.tree_map_only(torch.Tensor, torch.clone, out)

    if getattr(fn, "_boxed_call", False):
        def boxed(args: list) -> Any:
            return copy(fn(args))

        boxed._boxed_call = True  # type: ignore[attr-defined]
        return boxed

    def run(*args: Any) -> Any:
        return copy(fn(*args))

    return run
