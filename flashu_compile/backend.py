"""The ``flashu`` torch.compile backend: parse options, run the enabled passes, lower the graph.

Registered through the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="flashu", options={...})`` works after ``pip install`` without
importing this package first. Nothing registers at import time, so importing it twice (or
after dynamo loaded the entry point) cannot collide with the registry.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .backends import lower
from .backends.lowerings import lowering_for
from .backends.segmented import LazyLowered
from .backends.specialized import Specializations
from .graph import build_index
from .graph.compat import ShortenTraceback
from .graph.outline import outline_blocks
from .graph.rewrite import StrictModeError, copy_graph, is_symbolic
from .graph.specialize import layer_guards
from .graph.timestep import conditioning_inputs, timestep_input
from .options import FlashUOptions
from .passes.manager import Pass, PassContext, PassManager
from .passes.registry import REGISTRY
from .runtime.compile_profile import phase, profiled
from .runtime.flops import call_counted, counted
from .runtime.guards import Controller, full_phase
from .runtime.request import current_request, serving
from .runtime.sampler_rules import SamplerRules
from .runtime.schedule import StepRules
from .runtime.timeline import CallWatch, recording
from .validate import warn_user


def build_pass_list(options: FlashUOptions, task: str | None = None) -> list[tuple[str, Pass]]:
    """The enabled passes that rewrite ``task``'s graphs (any task's when None), in the registry's canonical order."""
    # Canonical order (each pass's ``order``): tokens are dropped and the prefix cached before layers are outlined
    # (both rewrite inside them), and layer and prefix guards must exist before the head trunk that contains them
    # is outlined.
    return [(spec.name, spec.fn) for spec in REGISTRY.values()
            if spec.name in options.passes and (task is None or task in spec.tasks)]


class PhasedProgram:
    """The rewritten graph for most steps, the unrewritten one (if any) for the final full-network steps,
    and (if any) a guard-free specialization once the step's skip set can no longer change.

    Each call first finds the request it serves (:func:`runtime.request.serving`): the caller's, or one
    inferred from the inputs: a denoising graph's flow time ``t`` (input ``timestep``), or whether an
    answer's graph begins a request (``starts``: a prefill or a forward without a KV cache) or
    continues one (a decode step). A denoising graph whose ``t`` was not found cannot tell requests
    apart: outside a request it runs its full network, with one warning. The denoising graph's
    conditioning inputs (text rows, mask, span positions) tell whose request a call continues.
    """

    def __init__(self, controller: Controller, rewritten: Callable, full: Callable | None,
                 specialized: Specializations | None = None, *, timestep: int | None = None,
                 conditioning: tuple[int, ...] = (), starts: bool = True) -> None:
        self.controller = controller
        self.rewritten = rewritten
        self.full = full
        self.specialized = specialized
        self.timestep = timestep
        self.conditioning = conditioning
        self.starts = starts
        self.warned_ambiguous = False

    def __call__(self, *args: Any) -> Any:
        task = self.controller.task
        if task == "t2i" and self.timestep is None and current_request() is None:
            if not self.warned_ambiguous:
                self.warned_ambiguous = True
                warn_user("flashu: this denoising graph's flow time t was not found among its inputs, so its "
                          "calls cannot be told apart into requests; run the loop inside "
                          "flashu_compile.request('t2i', calls=N). Until then it runs the full network")
            return call_counted(self.rewritten, *args)
        time = conditioning = None
        if task == "t2i" and self.timestep is not None:
            time = float(args[self.timestep].reshape(-1)[0])
            conditioning = tuple(args[i] for i in self.conditioning) or None
        with serving(task, starts=self.starts, time=time, conditioning=conditioning):
            run, phase = self.rewritten, "rewritten"
            if self.full is not None and full_phase(self.controller.id):
                run, phase = self.full, "full"
            elif self.specialized is not None and (skip := self.controller.settled_skip()) is not None:
                run, phase = self.specialized.get(skip), "specialized"
            if not recording():
                return call_counted(run, *args)
            return self._recorded(run, phase, args)

    def _recorded(self, run: Callable, phase: str, args: tuple) -> Any:
        """``run`` with a timeline record of what this call decided (runtime.timeline)."""
        st = self.controller.state()
        watch = CallWatch(st.history if st is not None else None)
        out = call_counted(run, *args)
        if st is None:
            watch.close(self.controller.task, 0, "outside", frozenset(), False)
        else:
            measured = phase != "full" and st.recalc_due
            skipped = st.skip if phase != "full" and not measured else frozenset()
            req = current_request()
            unplaced = self.full is not None and req is not None and req.calls is None
            watch.close(self.controller.task, st.step, phase, skipped, measured, unplaced)
        return out


def _load_plan(plan: Any):
    if plan is None:
        return None
    from .calibrate import Plan

    return plan if isinstance(plan, Plan) else Plan.load(plan)


logger = logging.getLogger(__name__)

# The library's own errors: bad options or plans (ValueError, PlanError among them) and strict mode's.
_USER_ERRORS = (ValueError, StrictModeError)
_SURFACED: dict[type, type] = {}


def _surfaced(error: Exception) -> Exception:
    """``error`` as an instance of a subclass of both its own type and dynamo's ``ShortenTraceback``, which
    dynamo lets through unwrapped: ``except PlanError`` (or ValueError) around a plain ``torch.compile``'d
    call catches it, where dynamo would otherwise wrap it in ``BackendCompilerFailed``."""
    cls = type(error)
    if cls not in _SURFACED:
        _SURFACED[cls] = type(cls.__name__, (cls, ShortenTraceback),
                              {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
    surfaced = Exception.__new__(_SURFACED[cls])
    surfaced.args = error.args
    surfaced.__dict__.update(error.__dict__)
    surfaced.first_useful_frame = None  # ShortenTraceback's: keep the whole traceback
    return surfaced


def flashu_backend(gm: torch.fx.GraphModule, example_inputs: list, options: Any = None) -> Callable:
    """Dynamo backend entry: ``options`` is the dict given to ``torch.compile``.

    The library's errors (bad options or plan: ValueError and :class:`PlanError`; strict mode:
    :class:`StrictModeError`) reach the caller of the compiled function by their own types.
    """
    try:
        with _cycle_collection_paused():
            return _compile(gm, example_inputs, options)
    except _USER_ERRORS as error:
        raise _surfaced(error).with_traceback(error.__traceback__) from error.__cause__


@contextlib.contextmanager
def _cycle_collection_paused() -> Iterator[None]:
    """Python's cyclic garbage collector held off while a graph is rewritten and lowered.

    The passes copy graphs (a snapshot before each pass, copies for the lowering), and FX graphs are cycles of
    nodes: the allocations start collections, each of which scans every object the process holds. Held off,
    a 10-layer model's first answer (4.2 s on a warm start) comes 0.16-0.25 s sooner; reference counting still
    frees what it can, and the cycles left wait for the first collection after. A collector the caller disabled
    stays disabled.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def sampler_rules(options: Any = None, model: torch.nn.Module | None = None) -> SamplerRules:
    """The rules a model's sampler follows for programs compiled with ``options`` (the dict given to
    ``torch.compile``, or FlashUOptions): their guidance schedule, and a request around each image's calls.

    The options are checked here, and a Plan among them against ``model`` as a whole (each graph checks only
    the weights it reads), so a model's in-place ``compile`` refuses them at the call, before anything compiles.
    A model finds this function as the ``sampler_rules`` attribute of the backend its ``compile`` was given.
    """
    opts = FlashUOptions.from_dict(options)
    if model is not None and hasattr(opts.plan, "verify_model"):
        opts.plan.verify_model(model)
    return SamplerRules(opts.guidance_schedule, opts.step_semantics)


flashu_backend.sampler_rules = sampler_rules


def _compile(gm: torch.fx.GraphModule, example_inputs: list, options: Any) -> Callable:
    opts = FlashUOptions.from_dict(options)
    lowering = lowering_for(opts)  # a name, or the TensorRT lowering's settings
    if not build_pass_list(opts):
        return counted(lower(gm, example_inputs, lowering))
    with phase("structure index"):
        index = build_index(gm, example_inputs)
    if not index.applicable:
        if opts.strict:
            raise StrictModeError(f"flashu cannot rewrite this graph: {index.report()}")
        # A graph the index does not understand is lowered unchanged rather than guessed at. A preset compiled over
        # a whole model meets such graphs by design (an image embedding): the user is told only of passes they named.
        if not opts.by_preset:
            warn_user(f"flashu passes skipped for this graph, {index.report()}")
        logger.info("passes skipped for a graph of %d nodes: %s", len(gm.graph.nodes), index.report())
        return counted(lower(gm, example_inputs, lowering))
    task = opts.task if opts.task != "auto" else ("t2i" if index.head_blocks else "mmu")
    passes = build_pass_list(opts, task)
    logger.debug("graph of %d nodes: task %s, %d decoder layers, %d flow-head blocks, passes %s, lowering %s",
                 len(gm.graph.nodes), task, len(index.layers), len(index.head_blocks), [n for n, _ in passes],
                 opts.lowering)
    phased = task == "t2i" and opts.hybrid_tau > 0 and any(REGISTRY[name].hybrid for name, _ in passes)
    # Layers are measured only where some will be skipped: int(L * skip_ratio) may round to none.
    skipping = any(REGISTRY[name].skips_layers for name, _ in passes) and int(len(index.layers) * opts.skip_ratio) > 0
    controller = Controller(task, StepRules.from_options(opts), num_layers=len(index.layers) if skipping else 0,
                            skip_ratio=opts.skip_ratio, phased=phased)
    full = copy_graph(gm) if phased else None
    if full is not None and opts.lowering == "inductor":
        # The final phase's graph is the whole network again: compiled block by block, its repeated layers
        # compile once (regional compilation) instead of adding a whole-network compile to the first request.
        outline_blocks(full, example_inputs, controller.id)
    # Found before the passes, which may outline the time embedding's first ops into a region.
    timestep = timestep_input(gm, example_inputs) if task == "t2i" else None
    conditioning = conditioning_inputs(gm, example_inputs, timestep) if timestep is not None else ()
    # A preset compiled over a whole model gives its prefill-only passes every answer graph, decode steps included.
    expected = frozenset(n for n, _ in passes if opts.by_preset and not REGISTRY[n].decode_steps)
    manager = PassManager([(name, profiled(f"pass {name}")(fn)) for name, fn in passes], strict=opts.strict,
                          dump_dir=opts.debug_dir, expected=expected)
    for spec in REGISTRY.values():
        if spec.name in opts.passes and task not in spec.tasks:
            why = (f"it rewrites {' and '.join(spec.tasks)} graphs and this is a {task} graph "
                   f"({'with' if index.head_blocks else 'without'} a flow head)")
            if opts.by_preset and not opts.strict:
                # A preset spans both tasks by design: each graph gets the passes of its task, without a warning.
                logger.info("pass %s left out: %s", spec.name, why)
            else:
                manager.not_applicable(spec.name, why)
    ctx = PassContext(index, task, controller, _load_plan(opts.plan))
    weights = _parameters(gm, example_inputs)
    for name, _ in passes:
        if REGISTRY[name].prepare is not None:
            REGISTRY[name].prepare(ctx, weights)
    gm = manager.run(gm, ctx, opts)
    # Kept before lowering, which may rewrite the graph it is given.
    rewritten = copy_graph(gm) if _specializable(gm, controller, opts) else None
    with phase("lowering graph"):
        # A graph with specializations is their fallback: an answer settles its skip set in the prefill, so its
        # decode steps run a specialization and this graph compiles only if some call needs it.
        compiled = lower(gm, example_inputs, lowering, defer=rewritten is not None)
    specialized = Specializations(rewritten, lowering, opts.decode_graphs, compiled) if rewritten else None
    # The program holds its controller: guard nodes only name it by id (a weak map of ids).
    return PhasedProgram(controller, compiled,
                         LazyLowered(full, lowering, example_inputs) if full is not None else None, specialized,
                         timestep=timestep, conditioning=conditioning,
                         starts=not _continues_a_cache(gm))


def _parameters(gm: torch.fx.GraphModule, example_inputs: list) -> list[tuple[str, torch.Tensor]]:
    """The weights the graph reads, by placeholder name: what a plan is checked against."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [(node.name, value) for node, value in zip(placeholders, example_inputs, strict=False)
            if isinstance(value, torch.nn.Parameter)]


def _continues_a_cache(gm: torch.fx.GraphModule) -> bool:
    """Whether the graph extends a KV cache it is given (a decode step): some layer carries a past key or value."""
    return any(any(p > 0 for p in node.args[3]) for node in layer_guards(gm))


def _specializable(gm: torch.fx.GraphModule, controller: Controller, opts: FlashUOptions) -> bool:
    """Whether the graph is a decode step worth guard-free graphs: an answer's layers may be skipped once its
    skip set is settled, and the graph serves every cache length (a graph traced for one size serves one
    step per answer, the first decode, so a compile for it would never pay off)."""
    return bool(opts.decode_graphs and controller.task == "mmu"
                and any(-1 not in node.args[3] for node in layer_guards(gm))
                and any(is_symbolic(n.meta.get("example_value")) for n in gm.graph.nodes if n.op == "placeholder"))
