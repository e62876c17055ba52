"""Lower through Torch-TensorRT's dynamo path: ``torch.export``, then ``torch_tensorrt.dynamo.compile``.

What the graph becomes before Torch-TensorRT sees it (on a copy; the original stays intact for
the fallback):

- no marker ops (:data:`MARKERS`): they carry facts for passes and have no converter; each is
  replaced by the input it passes through;
- no tensor values: weights already arrive as graph inputs (dynamo's placeholders), and tensors a
  pass wrote onto the graph (pruned weights) are lifted to inputs too, so a program depends on the
  graph's structure and input shapes only (:func:`.trt_cache.graph_hash`), never on weight values,
  and graphs that differ only in weights (identical layers) share one program and one engine;
- no symbolic scalars: an input that dynamo made a ``SymInt`` (a decode step's cache length) is
  recomputed inside the graph from a tensor dimension that holds it;
- every symbolic dimension declared as a range: ``torch_tensorrt.Input(min_shape, opt_shape,
  max_shape)`` with dynamo's lower bound, the size of this trace, and ``trt_max_size`` (or
  dynamo's upper bound if lower), and the matching ``torch.export.Dim`` for the export.

Engines go through Torch-TensorRT's engine cache (``cache_built_engines``,
``reuse_cached_engines``, ``engine_cache_dir``; refittable engines, which that cache needs), so a
later process builds nothing it built before. Precision: ``"explicit"`` keeps the graph's own
dtypes (Torch-TensorRT's strong typing, its default since 2.11); ``"bf16"``/``"fp16"`` turn on its
autocast to that type. ``enabled_precisions`` is never passed: deprecated in 2.11 and removed in
2.13. A graph that cannot be prepared, exported or compiled runs with Inductor, with a warning.

Unverified on hardware: no GPU with TensorRT has run this; the calls are checked against a
recording stand-in (tests/backends/test_tensorrt_contract.py) and the API of Torch-TensorRT 2.11-2.13.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sympy
import torch
import torch.fx
import torch.utils._pytree as pytree
from torch._guards import tracing
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

from ..graph.rewrite import copy_graph, is_symbolic
from ..runtime.markers import MARK_VISUAL
from ..validate import warn_user
from .trt_cache import attribute, cache_key, default_root, graph_hash

# Marker op -> the index of the argument it passes through unchanged.
MARKERS: dict[Any, int] = {MARK_VISUAL: 0}
PRECISIONS: dict[str, torch.dtype | None] = {"explicit": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Settings of every compile call that no option changes: single ops may become engines (the graphs
# are already cut at guards), and engines are refittable, which Torch-TensorRT's engine cache needs.
FIXED_SETTINGS: dict[str, Any] = {"min_block_size": 1, "immutable_weights": False}


@dataclass(frozen=True)
class TensorRTSettings:
    """The TensorRT lowering's options (``trt_*`` in FlashUOptions, which validates them); part of every program key."""

    precision: str = "explicit"  # a key of PRECISIONS
    cache_dir: str | None = None  # None: $FLASHU_TRT_CACHE or ~/.cache/flashu-compile/trt
    max_size: int = 4096  # declared upper bound of every symbolic size dynamo leaves unbounded

    @classmethod
    def from_options(cls, options: Any) -> TensorRTSettings:
        """From a FlashUOptions (its ``trt_precision``, ``trt_cache_dir`` and ``trt_max_size``)."""
        return cls(options.trt_precision, options.trt_cache_dir, options.trt_max_size)

    def root(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else default_root()

    def compile_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``torch_tensorrt.dynamo.compile`` besides the program, inputs and device."""
        kwargs = dict(FIXED_SETTINGS, cache_built_engines=True, reuse_cached_engines=True,
                      engine_cache_dir=str(self.root()))
        if PRECISIONS[self.precision] is not None:
            kwargs |= {"enable_autocast": True, "autocast_low_precision_type": PRECISIONS[self.precision]}
        return kwargs


def tensorrt_unavailable_reason() -> str | None:
    """Why the TensorRT lowering cannot run on this machine, or None if it can."""
    try:
        import torch_tensorrt  # noqa: F401
    except ImportError:
        return "torch-tensorrt is not installed (pip install 'flashu-compile[tensorrt]')"
    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA device and none is available"
    return None


def environment() -> dict[str, Any]:
    """The library versions and GPU engines built here depend on (for manifests; needs CUDA)."""
    import tensorrt
    import torch_tensorrt

    device = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"torch": torch.__version__, "torch_tensorrt": torch_tensorrt.__version__,
            "tensorrt": tensorrt.__version__, "gpu": device.name, "capability": [device.major, device.minor]}


class NotLowerable(Exception):
    """The graph has something this lowering cannot declare to TensorRT (the message says what)."""


@dataclass(frozen=True)
class InputRange:
    """One input of a prepared graph as declared to TensorRT (equal shapes: a static input)."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]
    dtype: torch.dtype

    @property
    def static(self) -> bool:
        return self.min == self.max


@dataclass
class Prepared:
    """A graph ready for export: its inputs are the original ones minus ``dropped``, plus ``constants``."""

    gm: torch.fx.GraphModule
    dropped: list[int]  # positions of the original inputs recomputed inside the graph
    constants: list[torch.Tensor]  # lifted tensors, passed after the original inputs
    ranges: list[InputRange]
    dims: list[dict[int, Any]]  # per input, its symbolic dimensions as torch.export dims


def strip_markers(gm: torch.fx.GraphModule) -> int:
    """Replace every marker op by the input it passes through; returns how many were removed."""
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in MARKERS:
            node.replace_all_uses_with(node.args[MARKERS[node.target]])
            gm.graph.erase_node(node)
            removed += 1
    return removed


def _lift_constants(gm: torch.fx.GraphModule) -> list[torch.Tensor]:
    """Turn every tensor the graph reads as an attribute into a trailing input; returns the tensors."""
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    lifted: dict[str, torch.fx.Node] = {}
    constants = []
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or not (node.target in lifted or isinstance(attribute(gm, node.target), torch.Tensor)):
            continue
        if node.target not in lifted:
            value = attribute(gm, node.target)
            with gm.graph.inserting_after(last):
                last = lifted[node.target] = gm.graph.placeholder(f"constant_{len(constants)}")
            last.meta["val"] = value
            constants.append(value.detach())
            # Off the copy too (its attribute tree is its own): export would otherwise carry it as a parameter.
            owner, _, name = node.target.rpartition(".")
            delattr(attribute(gm, owner) if owner else gm, name)
        node.replace_all_uses_with(lifted[node.target])
        gm.graph.erase_node(node)
    return constants


def _flatten_tuple_inputs(gm: torch.fx.GraphModule, view: list) -> list:
    """Replace each tuple input (a guard's output reaching a segment) by one input per element; returns the
    flattened view, in ``pytree.tree_leaves`` order, as the program flattens its arguments."""
    flat = []
    for node, value in zip([n for n in gm.graph.nodes if n.op == "placeholder"], view, strict=True):
        if not isinstance(value, (tuple, list)):
            flat.append(value)
            continue
        if any(isinstance(v, (tuple, list)) for v in value) or not all(
                u.target is operator.getitem and isinstance(u.args[1], int) for u in node.users):
            raise NotLowerable(f"input {node.name} is a nested or sliced sequence")
        with gm.graph.inserting_before(node):
            elements = [gm.graph.placeholder(f"{node.name}_{k}") for k in range(len(value))]
        for user in list(node.users):
            user.replace_all_uses_with(elements[user.args[1]])
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        flat.extend(value)
    return flat


def _sizes(value: Any) -> list[Any]:
    return list(value.shape) if isinstance(value, torch.Tensor) else []


def _expr(size: Any) -> sympy.Expr:
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(size)


def _offset(expr: sympy.Expr) -> tuple[sympy.Symbol, int]:
    """``expr`` as ``symbol + offset``; NotLowerable for any other form."""
    symbols = list(expr.free_symbols)
    if len(symbols) == 1 and (expr - symbols[0]).is_Integer:
        return symbols[0], int(expr - symbols[0])
    raise NotLowerable(f"symbolic size {expr} is not a single symbol plus a constant")


def _symbol_inputs(gm: torch.fx.GraphModule, view: list) -> list[int]:
    """Recompute each SymInt input from a tensor dimension holding it (``s`` or ``s + k``); returns their positions."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    dims = [(i, d, _expr(size)) for i, value in enumerate(view) for d, size in enumerate(_sizes(value))]
    dropped = []
    for i, value in enumerate(view):
        if isinstance(value, torch.Tensor):
            continue
        if not isinstance(value, torch.SymInt):
            raise NotLowerable(f"input {i} is a {type(value).__name__}, not a tensor or a symbolic size")
        symbol, offset = _offset(value.node.expr)
        holder = next(((j, d, int(e - symbol) - offset) for j, d, e in dims if (e - symbol).is_Integer), None)
        if holder is None:
            raise NotLowerable(f"symbolic input {i} ({value.node.expr}) is no tensor's dimension")
        j, d, extra = holder
        with gm.graph.inserting_after(placeholders[-1]):
            size = gm.graph.call_function(torch.ops.aten.sym_size.int, (placeholders[j], d))
        if extra:
            with gm.graph.inserting_after(size):
                size = gm.graph.call_function(operator.sub, (size, extra))
        placeholders[i].replace_all_uses_with(size)
        gm.graph.erase_node(placeholders[i])
        dropped.append(i)
    return dropped


def _declare(values: list, max_size: int) -> tuple[list[InputRange], list[dict[int, Any]]]:
    """Each tensor's (min, opt, max) shapes and export dims; one export Dim per symbol, derived dims for ``s + k``."""
    roots: dict[sympy.Symbol, Any] = {}
    ranges, dims = [], []
    for i, value in enumerate(values):
        low, opt, high, spec = [], [], [], {}
        for d, size in enumerate(value.shape):
            if not isinstance(size, torch.SymInt):
                low.append(int(size)), opt.append(int(size)), high.append(int(size))
                continue
            symbol, offset = _offset(size.node.expr)
            bounds = size.node.shape_env.var_to_range[symbol]
            hint = int(size.node.hint) - offset
            lower, upper = max(int(bounds.lower), 0), int(min(bounds.upper, max_size))  # upper may be infinite
            if hint > upper:
                raise NotLowerable(f"input {i} has size {hint + offset} in dimension {d}, beyond the declared "
                                   f"maximum {upper + offset} (raise the option 'trt_max_size')")
            if symbol not in roots:
                roots[symbol] = torch.export.Dim(str(symbol), min=lower, max=upper)
            spec[d] = roots[symbol] + offset if offset else roots[symbol]
            low.append(lower + offset), opt.append(hint + offset), high.append(upper + offset)
        ranges.append(InputRange(tuple(low), tuple(opt), tuple(high), value.dtype))
        dims.append(spec)
    return ranges, dims


def _symbolic_view(gm: torch.fx.GraphModule, example_inputs: list) -> list:
    """The inputs with their symbolic sizes: fakes as given (a piece of a graph compiling now), else dynamo's
    example values, whose SymInts and tensor sizes share one set of symbols (real inputs carry none)."""
    if any(isinstance(x, FakeTensor) for x in example_inputs):
        return list(example_inputs)
    values = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
    return values if any(is_symbolic(v) for v in values) else list(example_inputs)


def prepare(gm: torch.fx.GraphModule, example_inputs: list, max_size: int) -> Prepared:
    """The graph as Torch-TensorRT gets it (see the module docstring); ``gm`` itself is not changed."""
    gm = copy_graph(gm)
    strip_markers(gm)
    view = _flatten_tuple_inputs(gm, _symbolic_view(gm, example_inputs))
    dropped = _symbol_inputs(gm, view)
    constants = _lift_constants(gm)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    kept = [v for i, v in enumerate(view) if i not in dropped] + constants
    ranges, dims = _declare(kept, max_size)
    return Prepared(gm, dropped, constants, ranges, dims)


def _example(value: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A real tensor to export with: a new view of the input if it is real (export marks the tensors it is given,
    and dynamo guards on the caller's), else an uninitialised one of ``shape``."""
    if not isinstance(value, FakeTensor):
        return value.detach()
    with unset_fake_temporarily():
        return torch.empty(shape, dtype=value.dtype, device=value.device)


class TensorRTProgram:
    """A compiled program called with the graph's original inputs: flattens them, drops the recomputed ones,
    appends the lifted constants."""

    def __init__(self, module: Callable, dropped: list[int], constants: list[torch.Tensor], key: str) -> None:
        self.module, self.dropped, self.constants, self.key = module, set(dropped), constants, key

    def __call__(self, *args: Any) -> Any:
        flat = pytree.tree_leaves(args)
        return self.module(*(a for i, a in enumerate(flat) if i not in self.dropped), *self.constants)


# Programs compiled in this process, by key (see trt_cache): identical graphs are compiled once.
PROGRAMS: dict[str, Callable] = {}
# While a tool records (lowered_keys), the key of every graph lowered, in order; None otherwise, so nothing
# accumulates in a process that does not ask.
_LOWERED: ContextVar[list[str] | None] = ContextVar("flashu_trt_lowered", default=None)


@contextlib.contextmanager
def lowered_keys() -> Iterator[list[str]]:
    """The keys (see trt_cache) of the TensorRT programs lowered inside, compiled or shared with a twin, in order."""
    keys: list[str] = []
    token = _LOWERED.set(keys)
    try:
        yield keys
    finally:
        _LOWERED.reset(token)


def _compile(prepared: Prepared, example_inputs: list, settings: TensorRTSettings) -> tuple[Callable, str]:
    import torch_tensorrt

    key = cache_key(graph_hash(prepared.gm, prepared.ranges), asdict(settings) | {"compile": settings.compile_kwargs()})
    if (recording := _LOWERED.get()) is not None:
        recording.append(key)
    if key in PROGRAMS:
        return PROGRAMS[key], key
    kept = [x for i, x in enumerate(pytree.tree_leaves(example_inputs)) if i not in prepared.dropped]
    args = tuple(_example(x, r.opt) for x, r in zip([*kept, *prepared.constants], prepared.ranges, strict=True))
    # Outside dynamo's tracing context: export would otherwise trace in dynamo's fake mode and add its
    # own assumptions to the guards of the frame being compiled.
    with unset_fake_temporarily(), tracing(None):
        exported = torch.export.export(prepared.gm, args, dynamic_shapes=prepared.dims if any(prepared.dims) else None,
                                        strict=False)
        specs = [torch_tensorrt.Input(shape=r.opt, dtype=r.dtype) if r.static else
                 torch_tensorrt.Input(min_shape=r.min, opt_shape=r.opt, max_shape=r.max, dtype=r.dtype)
                 for r in prepared.ranges]
        device = next(x.device for x in args if isinstance(x, torch.Tensor))
        module = torch_tensorrt.dynamo.compile(exported, arg_inputs=specs, device=device, **settings.compile_kwargs())
    PROGRAMS[key] = module
    return module, key


def lower_tensorrt(gm: torch.fx.GraphModule, example_inputs: list,
                   settings: TensorRTSettings | None = None) -> Callable:
    """Lower ``gm`` with Torch-TensorRT; a graph it cannot take runs with Inductor, with a warning.

    Raises RuntimeError at once if torch-tensorrt or CUDA is missing: that is a setup error, not a graph's.
    """
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"lowering='tensorrt' cannot be used: {reason}")
    settings = settings if settings is not None else TensorRTSettings()
    try:
        prepared = prepare(gm, example_inputs, settings.max_size)
        module, key = _compile(prepared, example_inputs, settings)
    except Exception as error:  # any failure has the same remedy: this graph runs without TensorRT
        warn_user(f"TensorRT cannot lower this graph ({type(error).__name__}: {error}); it runs with Inductor")
        from .inductor import lower_inductor

        return lower_inductor(gm, example_inputs)
    return TensorRTProgram(module, prepared.dropped, prepared.constants, key)
