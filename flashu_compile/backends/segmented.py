"""Lower a graph that contains guard ops: compiled segments in between, guards run in Python.

The graph is cut at every guard node. Each maximal run of ordinary nodes becomes a segment
lowered on its own (Inductor, TensorRT or eager); each guard's outlined region is lowered the
same way, recursively, so a region may hold guards of its own (the flow-head trunk holds the
layer guards). Segments of a static-shape graph compile lazily on their first call, with the
real inputs of that call. A graph dynamo traced with symbolic sizes (a decode step whose KV
cache grows) instead compiles every piece at once, while dynamo's tracing context is still
open, on fake inputs that carry its symbols: the pieces then accept every size the graph does,
and whatever they assume about the symbols becomes one of dynamo's guards on the whole graph.
A graph that serves only as a fallback (a decode step whose answers run its specializations)
defers that compile to its first call, if any: it then compiles on the same fakes after dynamo's
context has closed (:func:`compile_on_trace`), where no guard can be added any more, so it keeps
the compiled pieces only if they assumed nothing about the symbols, and runs eagerly otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sympy
import torch.fx
import torch.utils._pytree as pytree

from ..graph.compat import FakeTensor, TracingContext, detect_fake_mode, fuse_as_graphmodule, shape_assumptions, tracing
from ..graph.rewrite import copy_graph, has_guards, is_symbolic
from ..runtime.compile_profile import phase, piece_kind
from ..runtime.guards import GUARDS
from ..validate import warn_user
from .lowerings import Lowering, lower_unguarded


def lower(gm: torch.fx.GraphModule, example_inputs: list, lowering: Lowering, defer: bool = False) -> Callable:
    """Lower ``gm``: a graph with guards becomes a SegmentedProgram of lowered pieces, any other graph is
    lowered whole (see :func:`lowerings.lower_unguarded` for what ``lowering`` may be). ``defer``: a
    SegmentedProgram traced with symbolic sizes compiles on its first call instead of now."""
    if has_guards(gm):
        # Guards read per-step state in Python; only the segments between them are compiled.
        return SegmentedProgram(gm, lowering, example_inputs, defer=defer)
    return lower_unguarded(gm, example_inputs, lowering)


def compile_on_trace(fakes: list, compile_now: Callable[[], None]) -> bool:
    """Run ``compile_now`` (a compile on ``fakes``, fake inputs of a trace dynamo has finished) in a tracing context
    of their fake mode; returns whether it assumed nothing about their symbols (no guard, runtime assertion,
    replacement or narrowed range), the condition for its code to serve every call the trace's guards admit."""
    fake_mode = detect_fake_mode(fakes)
    before = shape_assumptions(fake_mode.shape_env)
    with tracing(TracingContext(fake_mode)):
        compile_now()
    return shape_assumptions(fake_mode.shape_env) == before


def _expr(size: Any) -> sympy.Expr | None:
    return size.node.expr if isinstance(size, torch.SymInt) else None


def unbound_symbols(example_inputs: list) -> list[tuple[int, int, int]]:
    """How to recover each symbol the inputs' sizes use but no input states bare, as ``(leaf, dim, offset)``
    with ``leaf`` an index into the inputs' pytree leaves (a guard's output reaches a segment as a tuple).

    Inductor binds a symbol from a SymInt input or a tensor dimension that is exactly that symbol. A
    piece cut from a larger graph can see a symbol only inside an expression (a cache of ``s0 + 1``
    rows), and Inductor then cannot generate code for it. Where some dimension is ``s + offset``, the
    symbol is ``size - offset`` and is passed to the piece as one more input. A symbol with no such
    dimension is left to fail in Inductor, which the caller answers with the eager fallback.
    """
    bound: set[sympy.Symbol] = set()
    used: set[sympy.Symbol] = set()
    dims: list[tuple[int, int, sympy.Expr]] = []
    for i, x in enumerate(pytree.tree_leaves(example_inputs)):
        if isinstance(x, torch.SymInt):
            sizes, strides = [x], []
        elif isinstance(x, torch.Tensor):
            sizes, strides = list(x.shape), [*x.stride(), x.storage_offset()]
        else:
            continue
        for d, size in enumerate(sizes):
            if (e := _expr(size)) is not None:
                used |= e.free_symbols
                if e.is_Symbol:
                    bound.add(e)
                elif isinstance(x, torch.Tensor):
                    dims.append((i, d, e))
        used |= {s for stride in strides if (e := _expr(stride)) is not None for s in e.free_symbols}
    recover = []
    for symbol in sorted(used - bound, key=str):
        offsets = [(i, d, int(e - symbol)) for i, d, e in dims if (e - symbol).is_Integer]
        if offsets:
            recover.append(offsets[0])
    return recover


def _compile_or_run_eagerly(program: Any, compile_now: Callable[[], None], what: str, they: str) -> None:
    """Compile ``program`` for symbolic sizes now; if the lowering fails, warn and make it run eagerly.

    Any failure has the same remedy: e.g. Inductor cannot bind a symbol that reaches a piece only
    inside a size expression (s0 + 1), and correct results come first.
    """
    try:
        compile_now()
    except Exception as error:
        warn_user(f"compiling {what} with symbolic sizes failed ({type(error).__name__}: {error}); "
                  f"{they} eagerly")
        program.fall_back_to_eager()


class LazyLowered:
    """A graph lowered on first call, with that call's arguments as example inputs.

    Given the example inputs of a graph dynamo traced with symbolic sizes, it compiles at once
    instead, on fakes carrying dynamo's symbols: dynamo reuses such a graph for every size its
    guards admit, and a piece compiled from one call's real inputs would serve only that call's sizes.
    """

    def __init__(self, gm: torch.fx.GraphModule, lowering: str, example_inputs: list | None = None) -> None:
        self.gm = gm
        self.lowering = lowering
        self.fn: Callable | None = None
        self.recover: list[tuple[int, int, int]] = []  # extra symbol inputs, see ``unbound_symbols``
        fakes = symbolic_inputs(gm, example_inputs) if example_inputs is not None and lowering != "eager" else None
        if fakes is not None:
            _compile_or_run_eagerly(self, lambda: self.compile(fakes), "a graph", "it runs")

    def compile(self, example_inputs: list) -> None:
        gm = self.gm  # the lowerings that may rewrite a graph in place compile a copy of it
        # A nested program binds symbols piece by piece itself; its placeholders must match the guard's call.
        self.recover = [] if self.lowering == "eager" or has_guards(gm) else unbound_symbols(example_inputs)
        leaves = pytree.tree_leaves(example_inputs)
        extra = [leaves[i].shape[d] - offset for i, d, offset in self.recover]
        if extra:
            # On a copy: ``self.gm`` must stay the graph its callers run (fake propagation, an eager fallback).
            gm = copy_graph(self.gm)
            last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
            for k, value in enumerate(extra):
                with gm.graph.inserting_after(last):
                    last = gm.graph.placeholder(f"symbol_{k}")
                last.meta["val"] = last.meta["example_value"] = value
            gm.recompile()
        with phase(f"lowering {piece_kind(self.gm)}"):
            self.fn = lower(gm, [*example_inputs, *extra], self.lowering)

    def fall_back_to_eager(self) -> None:
        """Forget any compiled form (and those of nested pieces); lower eagerly on the next call."""
        if isinstance(self.fn, SegmentedProgram):
            self.fn.fall_back_to_eager()
        self.fn, self.lowering, self.recover = None, "eager", []

    def __call__(self, *args: Any) -> Any:
        if self.fn is None:
            self.compile(list(args))
        if self.recover:
            leaves = pytree.tree_leaves(args)
            args = (*args, *(leaves[i].shape[d] - offset for i, d, offset in self.recover))
        return self.fn(*args)


class _CompileOnFakes:
    """Compiles a guarded region for the fake inputs reaching it and returns its fake outputs."""

    def __init__(self, region: LazyLowered) -> None:
        self.region = region

    def __call__(self, *args: Any) -> Any:
        if has_guards(self.region.gm):
            # A nested program: its pieces compile now and it derives its outputs without running guards.
            self.region.compile(list(args))
            return self.region.fn.fake_output
        out = self.region.gm(*args)
        self.region.compile(list(args))
        return out


def symbolic_inputs(gm: torch.fx.GraphModule, example_inputs: list) -> list | None:
    """Fake inputs carrying dynamo's symbols if ``gm`` was traced with symbolic sizes, else None.

    Dynamo hands a backend real example tensors (and its SymInts) and keeps the symbolic shapes
    in the placeholders' ``example_value``; the fakes are remade in the tracing context's fake
    mode, from the symbolic context dynamo recorded per input, as AOTAutograd does. A region
    compiled from inside this module already gets fakes, and compiles with them whatever its sizes.
    """
    if any(isinstance(x, FakeTensor) for x in example_inputs):
        return list(example_inputs)  # a region of a program compiling now
    values = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
    context = TracingContext.try_get()
    if context is None or not any(is_symbolic(v) for v in values):
        return None
    fake_mode, symbols = context.fake_mode, context.tensor_to_context
    return [fake_mode.from_tensor(x, symbolic_context=symbols.get(x)) if isinstance(x, torch.Tensor) else x
            for x in example_inputs]


class SegmentedProgram:
    def __init__(self, gm: torch.fx.GraphModule, lowering: str, example_inputs: list | None = None,
                 defer: bool = False) -> None:
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.output = next(n for n in gm.graph.nodes if n.op == "output")
        self.steps: list[tuple[str, Any, list, list]] = []
        run: list[torch.fx.Node] = []
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            if node.op == "call_function" and node.target in GUARDS:
                self._add_segment(gm, run, lowering)
                run = []
                cid, attr, *rest = node.args
                region = LazyLowered(getattr(gm, attr.target), lowering)
                first = node.meta["flashu_region"]["first_input"] - 2  # in ``rest``
                self.steps.append(("guard", (node.target, cid, region, first), rest, [node]))
            elif node.op == "get_attr" and all(u.op == "call_function" and u.target in GUARDS for u in node.users):
                continue  # an outlined region: lowered with its guard
            else:
                run.append(node)
        self._add_segment(gm, run, lowering)
        self._plan_releases()
        self.fake_output: Any = None  # what the graph returns, on fakes, once compiled for symbolic sizes
        fakes = symbolic_inputs(gm, example_inputs or []) if lowering != "eager" else None
        self.deferred = fakes if defer else None  # fakes to compile on at the first call
        if fakes is not None and not defer:
            _compile_or_run_eagerly(self, lambda: self._compile_all(fakes), "the pieces of a graph", "they run")

    def _compile_deferred(self) -> None:
        fakes, self.deferred = self.deferred, None

        def compile_now() -> None:
            if not compile_on_trace(fakes, lambda: self._compile_all(fakes)):
                raise RuntimeError("the compile assumed something about the symbolic sizes, which no guard of the "
                                   "graph's trace checks")

        _compile_or_run_eagerly(self, compile_now, "the pieces of a graph", "they run")

    def fall_back_to_eager(self) -> None:
        for kind, fn, _, _ in self.steps:
            (fn if kind == "segment" else fn[2]).fall_back_to_eager()

    def _compile_all(self, fakes: list) -> None:
        """Compile every piece now, each on the fake values that reach it from ``fakes``."""
        fake_mode = detect_fake_mode(fakes)
        env: dict[torch.fx.Node, Any] = dict(zip(self.placeholders, fakes, strict=True))
        with fake_mode:
            for kind, fn, inputs, outputs in self.steps:
                values = [env[v] if isinstance(v, torch.fx.Node) else v for v in inputs]
                if kind == "segment":
                    env.update(zip(outputs, fn.gm(*values), strict=True))
                    fn.compile(values)
                else:
                    # Not through the guard: its step logic and runtime checks are for real inputs.
                    _, _, region, first = fn
                    env[outputs[0]] = _CompileOnFakes(region)(*values[first:])
            self.fake_output = torch.fx.node.map_arg(self.output.args[0], env.__getitem__)

    def _add_segment(self, gm: torch.fx.GraphModule, run: list[torch.fx.Node], lowering: str) -> None:
        if not run:
            return
        sub, inputs, outputs = fuse_as_graphmodule(gm, run, f"segment_{len(self.steps)}", always_return_tuple=True)
        if outputs:
            self.steps.append(("segment", LazyLowered(sub, lowering), list(inputs), list(outputs)))

    def _plan_releases(self) -> None:
        # Drop each intermediate after its last reader so peak memory stays that of one segment.
        last: dict[torch.fx.Node, int] = {}
        for i, (_, _, inputs, _) in enumerate(self.steps):
            for value in inputs:
                if isinstance(value, torch.fx.Node):
                    last[value] = i
        kept = set(self.output.all_input_nodes)
        self.releases = [[n for n, i in last.items() if i == k and n not in kept] for k in range(len(self.steps))]

    def __call__(self, *args: Any) -> Any:
        if self.deferred is not None:
            self._compile_deferred()
        env: dict[torch.fx.Node, Any] = dict(zip(self.placeholders, args, strict=True))
        for (kind, fn, inputs, outputs), release in zip(self.steps, self.releases, strict=True):
            values = [env[v] if isinstance(v, torch.fx.Node) else v for v in inputs]
            if kind == "segment":
                env.update(zip(outputs, fn(*values), strict=True))
            else:
                guard, cid, region, _ = fn
                env[outputs[0]] = guard(cid, region, *values)
            for node in release:
                env.pop(node, None)
        return torch.fx.node.map_arg(self.output.args[0], env.__getitem__)
