"""The pass registry: every rewrite declares itself here once, from its own module.

A pass module ends with ``SPEC = register(PassSpec(...))``: its option name, function, canonical
order, the tasks whose graphs it rewrites, the passes it conflicts with, its own options (each a
``Setting``: default and valid values), the node-metadata keys it writes, the hook graph-diff
describes its nodes with, and its bench row. The backend, options
validation (through :data:`flashu_compile.options.PASSES`, which ``register`` declares into, since
options sit below the passes), graph-diff and the bench read this registry and nothing else, so
adding a pass is one new module in this package (found by :func:`discover`) plus its tests.
docs/writing-a-pass.md is the guide.

Invariants: one spec per name; a spec's name, order, tasks, conflicts and settings are in
``options.PASSES`` exactly while it is registered; no setting shares a name with an option;
:data:`REGISTRY` iterates in canonical order.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx

from ..options import PASSES, PassInfo, Setting
from ..runtime.guards import Controller
from .manager import PROVENANCE_KEY, Pass, PassContext


@dataclass(frozen=True)
class DescribeContext:
    """What a describe hook knows of the request graph-diff describes a node for."""

    task: str  # "t2i" or "mmu"
    calls: int  # model calls of the request the schedules are described over
    region_nodes: int  # for a guard: nodes its region holds (0 for another node)


@dataclass(frozen=True)
class Described:
    """A node a pass made, in words: what it reads at run time, when it refreshes, what it does to shapes."""

    reads: str
    refresh: str
    shapes: str
    module: str | None = None  # the module the change belongs to; None: the module of the value the node stands for


# (a node the pass created, the request it is described for) -> its description, or None for a node that needs none
# (graph-diff then lists a guard call with a placeholder and leaves any other node out).
Describe = Callable[[torch.fx.Node, DescribeContext], Described | None]


@dataclass(frozen=True)
class BenchRow:
    """The bench's per-technique row (``--split``): the pass alone at the paper preset's settings, 50 steps."""

    short: str  # the row is named "flashu {short} 50"
    technique: str  # how the report names the technique


@dataclass(frozen=True)
class PassSpec:
    name: str  # the name ``options={"passes": [...]}`` uses
    fn: Pass
    order: int  # canonical position (lower runs first), spaced by 10 so a new pass fits between two
    tasks: tuple[str, ...]  # the graphs it rewrites: "t2i" (a denoising step), "mmu" (an answer's prefill or decode)
    writes: Mapping[str, str] = field(default_factory=dict)  # node.meta keys it sets -> what each holds
    conflicts: Mapping[str, str] = field(default_factory=dict)  # a pass it cannot run with -> why
    hybrid: bool = False  # approximate in a denoising graph: the final hybrid_tau calls run the unrewritten graph
    describe: Describe | None = None
    bench_row: BenchRow | None = None
    needs_plan: bool = False  # reads the calibration plan: the tools load or calibrate one when it is enabled
    decode_steps: bool = True  # False: rewrites an answer's prefill only (compile_tasks leaves it off the decode step)
    skips_layers: bool = False  # the backend measures layer importance for it (where int(L x skip_ratio) > 0)
    # Its own options (option name -> Setting), validated with the rest and read as ``options.<name>``.
    settings: Mapping[str, Setting] = field(default_factory=dict)
    # Checks what it will read before any pass runs (the graph's weights, by name, against the plan, say): its
    # ValueError is the user's (a bad plan is an error, not a skipped pass) and the graph is still untouched.
    prepare: Callable[[PassContext, list[tuple[str, torch.Tensor]]], None] | None = None


# Pass name -> spec, in canonical order.
REGISTRY: dict[str, PassSpec] = {}

# Written by every pass through ``tag`` (graph.rewrite), so a spec need not list it.
COMMON_WRITES = {PROVENANCE_KEY: '{"pass": name, "replaces": the name of the original node it stands for, or None}'}
# Written by graph.outline on the guard call of a region it outlines: the ``writes`` of a pass that outlines.
GUARD_REGION = {"flashu_region": '{"name": the region submodule, "nodes": how many nodes it holds, "guard": the guard '
                                 'function, "first_input": where the region inputs start among the guard\'s arguments}'}


def register(spec: PassSpec) -> PassSpec:
    """Add ``spec`` to the registry and its name, order, tasks and conflicts to ``options.PASSES``."""
    if spec.name in REGISTRY:
        raise ValueError(f"pass {spec.name!r} is registered twice")
    unknown = sorted(set(spec.conflicts) - {*REGISTRY, spec.name} - set(PASSES))
    if unknown:
        raise ValueError(f"pass {spec.name!r} conflicts with unregistered pass(es) {unknown}")
    PASSES.declare(PassInfo(spec.name, spec.order, spec.tasks, spec.conflicts, spec.needs_plan, spec.decode_steps,
                            spec.skips_layers, spec.settings))
    REGISTRY[spec.name] = spec
    ordered = sorted(REGISTRY.values(), key=lambda s: (s.order, s.name))
    REGISTRY.clear()
    REGISTRY.update((s.name, s) for s in ordered)
    return spec


def unregister(name: str) -> None:
    """Remove a pass (a test's own pass, after the test)."""
    del REGISTRY[name]
    PASSES.withdraw(name)


def discover() -> None:
    """Import every module of this package, so each pass module registers its spec."""
    package = __name__.rpartition(".")[0]
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        importlib.import_module(f"{package}.{module.name}")


def metadata_keys() -> dict[str, str]:
    """Every node.meta key the registered passes write -> what it holds."""
    keys = dict(COMMON_WRITES)
    for spec in REGISTRY.values():
        keys.update(spec.writes)
    return keys


# ----------------------------------------------------------------------------- prose the describe hooks share


def steps_text(steps: list[int], limit: int = 8) -> str:
    """A list of model calls, the first ``limit`` of them spelled out."""
    if not steps:
        return "none"
    shown = ", ".join(map(str, steps[:limit]))
    return f"{shown}, ... ({len(steps)} in all)" if len(steps) > limit else shown


def full_calls(ctl: Controller, calls: int) -> list[int]:
    """The calls of a ``calls``-call request that run the full network (the final hybrid phase)."""
    return [s for s in range(1, calls + 1) if ctl.phased and ctl.rules.full_phase(s, calls)]


def full_text(full: list[int]) -> str:
    return f"the full network runs from call {full[0]} (final phase)" if full else "there is no full-network phase"


def shape_text(node: torch.fx.Node) -> str:
    value = node.meta.get("example_value")
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else "unknown"
