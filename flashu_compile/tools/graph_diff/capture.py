"""Capturing a compilation: the graphs before and after every pass, and the report built from them.

The real backend compiles the function (eager lowering) while an observer on the pass manager
(:func:`~flashu_compile.passes.manager.observe_passes`) snapshots each graph before and after
every pass, so the diff shows exactly what a compilation produces.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx

from ...backend import flashu_backend
from ...graph.rewrite import copy_graph
from ...options import FlashUOptions
from ...passes.manager import PassContext, PassRecord, observe_passes
from ...runtime.request import request
from .compare import guards, module_changes
from .interpret import divergence, run
from .nodes import ORIGIN_KEY, ViewNode, flatten, param_shapes, stamp_captured, stamp_new
from .report import GraphDiff, GraphReport, PassDiff


@dataclass
class _Stage:
    gm: torch.fx.GraphModule
    view: list[ViewNode]
    record: PassRecord | None = None  # None for the captured graph


@dataclass
class _Capture:
    inputs: list
    snapshots: list[_Stage] = field(default_factory=list)
    task: str | None = None
    names: dict[str, dict] = field(default_factory=dict)  # node name -> origin, as the running pass saw them
    program: Callable | None = None

    def observe(self, name: str, when: str, gm: torch.fx.GraphModule, context: PassContext,
                record: PassRecord | None) -> None:
        self.task = context.task
        if when == "before":
            self.names = {n.name: n.meta[ORIGIN_KEY] for n in gm.graph.nodes}
            return
        stamp_new(gm, name, self.names)
        # Later passes erase nodes of the live graph; outlined regions never change once made, so copies share them.
        copy = copy_graph(gm)
        self.snapshots.append(_Stage(copy, flatten(copy), record))


def graph_diff(fn: Callable, example_inputs: Sequence, options: dict[str, Any] | FlashUOptions | None = None, *,
               step: int = 2, calls: int = 49, tolerance: float = 1e-3) -> GraphDiff:
    """Compile ``fn`` with the flashu backend and report what every pass did to every graph.

    ``example_inputs`` are passed to ``fn`` once to capture its graphs, then serve as the sample
    input of the numeric comparison, run as model call ``step`` of a request (calls before it set
    the guards' state: layer importance, the head cache). Guard schedules are described for a
    request of ``calls`` model calls. The lowering is always eager: the diff runs graphs as Python.
    Dynamo's caches are reset first. ``prune_channels`` permutes the model's FFN neurons in place,
    as compiling with a plan does.
    """
    opts = FlashUOptions.from_dict(options).replace(lowering="eager")
    if step < 1 or calls < 1:
        raise ValueError(f"step and calls must be at least 1, got {step} and {calls}")
    captures: list[_Capture] = []

    def capture(gm: torch.fx.GraphModule, inputs: list) -> Callable:
        stamp_captured(gm)
        copy = copy_graph(gm)
        taken = _Capture(list(inputs), [_Stage(copy, flatten(copy))])
        captures.append(taken)
        with observe_passes(taken.observe):
            taken.program = flashu_backend(gm, inputs, opts)
        return taken.program

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=capture)
    start = time.perf_counter()
    with torch.no_grad():
        compiled(*example_inputs)
    compile_seconds = time.perf_counter() - start
    first = len(captures)
    task = next((c.task for c in captures if c.task), None)
    # The guards read the request outside the graph: serving steps must not compile anything new.
    run_calls = max(calls, step + opts.hybrid_tau + 1)  # long enough that ``step`` is before the full phase
    with torch.no_grad(), request(task or "t2i", run_calls) as req:
        for _ in range(step):
            req.advance()
            compiled(*example_inputs)
    recompiles = len(captures) - first

    graphs = [_graph_report(i, c, step, run_calls, calls, tolerance) for i, c in enumerate(captures[:first])]
    shown = {name: value for name, value in opts.values().items() if name != "plan"}
    shown["plan"] = None if opts.plan is None else (str(opts.plan) if isinstance(opts.plan, (str, Path)) else "given")
    return GraphDiff(shown, step, calls, tolerance, graphs, recompiles, compile_seconds)


def _graph_report(index: int, capture: _Capture, step: int, run_calls: int, calls: int,
                  tolerance: float) -> GraphReport:
    runs = [run(s.gm, capture.inputs, capture.task, step, run_calls) for s in capture.snapshots]
    original = capture.snapshots[0]
    params = param_shapes(original.view)
    passes: list[PassDiff] = []
    diverged: set[str] = set()
    for i, snap in enumerate(capture.snapshots[1:], start=1):
        prev, record = capture.snapshots[i - 1], snap.record
        pb, pa = param_shapes(prev.view), param_shapes(snap.view)
        passes.append(PassDiff(
            record.name, record.changed, record.seconds, record.stats, record.skipped_reason,
            len(prev.view), len(snap.view), sum(v[2] for v in pb.values()), sum(v[2] for v in pa.values()),
            sum(runs[i - 1].flops.values()), sum(runs[i].flops.values()),
            module_changes(prev.view, snap.view, runs[i - 1], runs[i]),
            guards(prev.view, snap.view, capture.task, calls),
            divergence(original.view, runs[0], snap.view, runs[i], step, tolerance, diverged)
            if record.changed else None,
        ))
        if passes[-1].divergence is not None:
            diverged = {n.node for n in passes[-1].divergence.nodes if n.diverges}
    return GraphReport(index, capture.task, len(original.view), sum(v[2] for v in params.values()),
                       sum(runs[0].flops.values()), passes)


def to_json(diff: GraphDiff) -> str:
    return json.dumps(diff.to_json(), indent=1)
