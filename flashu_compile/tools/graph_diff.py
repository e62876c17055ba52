"""``flashu-compile graph-diff``: what every flashu pass did to a model's graphs.

The real backend compiles the function (eager lowering) while an observer on the pass manager
(:func:`~flashu_compile.passes.manager.observe_passes`) snapshots each graph before and after
every pass, so the diff shows exactly what a compilation produces. Snapshots are compared
without generated node names, which change between traces and when a pass outlines a region:
every node of the captured graph is stamped with an origin key (module path, op, occurrence),
node copies carry it into outlined regions, and a node a pass creates is keyed by its module,
the pass and its op, and linked to the node it stands for (``meta["flashu_pass"]["replaces"]``).

Per pass: changes per module (nodes added / removed / replaced, parameter shapes and bytes,
FLOPs of one model call), the guards inserted in words, compile time, and the numeric divergence
of every matched node from the unrewritten graph on the example input. The JSON form follows
``graph_diff.schema.json`` next to this file.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.fx

from ..backend import build_pass_list, flashu_backend
from ..backends.segmented import has_guards
from ..graph.structure import module_path
from ..options import FlashUOptions
from ..passes.manager import PROVENANCE_KEY, PassContext, PassRecord, observe_passes
from ..runtime.flops import _CountFlops
from ..runtime.guards import GUARDS, controller
from ..runtime.request import request

SCHEMA_PATH = Path(__file__).with_name("graph_diff.schema.json")
SCHEMA_VERSION = 1
ORIGIN_KEY = "flashu_origin"  # node.meta entry graph-diff stamps: {"key", "module", "replaces"}
_PARAM = re.compile(r"_parameters_(?P<name>.+)_$")


# ----------------------------------------------------------------------------- report data


@dataclass
class NodeChange:
    node: str  # origin key, e.g. "showo.model.layers.0.mlp.gate_proj:linear#0"
    op: str
    before: str | None  # "op(inputs) -> shape"; None for an added node
    after: str | None  # None for a removed node
    replaces: str | None = None  # origin key of the node an added node stands for


@dataclass
class ParamChange:
    name: str  # parameter FQN
    shape_before: list[int]
    shape_after: list[int]
    bytes_before: int
    bytes_after: int


@dataclass
class ModuleChange:
    path: str
    added: list[NodeChange] = field(default_factory=list)
    removed: list[NodeChange] = field(default_factory=list)
    replaced: list[NodeChange] = field(default_factory=list)  # rewritten by the pass or now reading another input
    reshaped: list[NodeChange] = field(default_factory=list)  # same op and inputs, another output shape
    params: list[ParamChange] = field(default_factory=list)
    flops_before: int = 0
    flops_after: int = 0


@dataclass
class GuardInfo:
    kind: str  # the guard function, e.g. "layer_guard"
    region: str  # the outlined submodule it calls
    module: str  # module path of the value it stands for
    nodes: int  # nodes moved into the region
    modules: dict[str, int]  # module path -> how many of its nodes the region now holds
    reads: str
    refresh: str
    shapes: str


@dataclass
class NodeDivergence:
    node: str
    module: str
    shape_before: list[int]
    shape_after: list[int]
    max_abs: float | None  # None when the shapes differ
    cosine: float | None
    diverges: bool


@dataclass
class Divergence:
    step: int  # the model call of a request both graphs ran as
    tolerance: float  # max-abs relative to the unrewritten value's largest magnitude
    compared: int
    shape_changed: int
    diverging: int
    first: NodeDivergence | None  # the first diverging node in the unrewritten graph's order
    first_new: NodeDivergence | None = None  # the first that was within tolerance after the previous pass
    nodes: list[NodeDivergence] = field(default_factory=list)


@dataclass
class PassDiff:
    name: str
    changed: bool
    seconds: float
    stats: dict[str, Any]
    skipped_reason: str | None
    nodes_before: int
    nodes_after: int
    param_bytes_before: int
    param_bytes_after: int
    flops_before: int
    flops_after: int
    modules: list[ModuleChange]
    guards: list[GuardInfo]
    divergence: Divergence | None


@dataclass
class GraphReport:
    index: int
    task: str | None  # None when no pass ran on this graph
    nodes: int
    param_bytes: int
    flops: int
    passes: list[PassDiff]


@dataclass
class GraphDiff:
    options: dict[str, Any]
    step: int
    calls: int
    tolerance: float
    graphs: list[GraphReport]
    recompiles: int  # graphs compiled while serving steps 1..step of a request, after the first call
    compile_seconds: float  # first call of the compiled function: tracing, passes, lowering and one run
    version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- origin keys


def _op_name(node: torch.fx.Node) -> str:
    if node.op in ("call_function", "call_method"):
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def _is_guard(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in GUARDS


def _stamp_captured(gm: torch.fx.GraphModule) -> None:
    """Key every node of a freshly captured graph by module path, op and occurrence."""
    seen: Counter = Counter()
    for position, node in enumerate(gm.graph.nodes):
        module = module_path(node) or ""
        if node.op == "placeholder":
            param = _PARAM.search(str(node.target))
            key = f"{module}.{param.group('name')}" if param and module else f"input#{position}"
            node.meta[ORIGIN_KEY] = {"key": key, "module": module if param else "", "replaces": None}
            continue
        op = _op_name(node)
        key = f"{module}:{op}#{seen[module, op]}"
        seen[module, op] += 1
        node.meta[ORIGIN_KEY] = {"key": key, "module": module, "replaces": None}


def _with_regions(gm: torch.fx.GraphModule) -> list[torch.fx.GraphModule]:
    """``gm`` and every region its guards call, nested ones included."""
    out = [gm]
    for node in gm.graph.nodes:
        if _is_guard(node):
            out.extend(_with_regions(getattr(gm, node.args[1].target)))
    return out


def _stamp_new(gm: torch.fx.GraphModule, pass_name: str, by_name: dict[str, dict]) -> None:
    """Key the nodes ``pass_name`` created, from the node each stands for or else its first user.

    A pass may create nodes and outline them in one go (``prefix_cache``): regions are searched too.
    """
    fresh = [n for g in _with_regions(gm) for n in g.graph.nodes if ORIGIN_KEY not in n.meta]
    replaced = {n: by_name.get((n.meta.get(PROVENANCE_KEY) or {}).get("replaces")) for n in fresh}
    modules = {n: origin["module"] for n, origin in replaced.items() if origin is not None}
    for node in reversed(fresh):  # a region's get_attr precedes the guard call that names its module
        if node not in modules:
            users = [u.meta.get(ORIGIN_KEY, {}).get("module") or modules.get(u) for u in node.users]
            modules[node] = next((m for m in users if m), "")
    seen: Counter = Counter()
    for node in fresh:
        module, op = modules[node], f"{pass_name}.{_op_name(node)}"
        node.meta[ORIGIN_KEY] = {"key": f"{module}:{op}#{seen[module, op]}", "module": module,
                                 "replaces": replaced[node]["key"] if replaced[node] else None}
        seen[module, op] += 1


# ----------------------------------------------------------------------------- graph views


@dataclass
class _Node:
    key: str
    module: str
    op: str
    fx: torch.fx.Node
    inputs: list[str]  # origin keys, region placeholders resolved to what the guard passes in
    region: tuple[str, ...]  # enclosing outlined regions, outermost first
    replaces: str | None


def _flatten(gm: torch.fx.GraphModule, region: tuple[str, ...] = (),
             outer: dict[torch.fx.Node, str] | None = None) -> list[_Node]:
    """Every node of a graph and of the regions its guards call, in execution order."""
    keys: dict[torch.fx.Node, str] = {}
    out: list[_Node] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder" and outer is not None:
            keys[node] = outer[node]
            continue
        if node.op == "output":
            continue
        origin = node.meta[ORIGIN_KEY]
        keys[node] = origin["key"]
        inputs = [keys[a] for a in node.all_input_nodes]
        out.append(_Node(origin["key"], origin["module"], _op_name(node), node, inputs, region, origin["replaces"]))
        if _is_guard(node):
            sub = getattr(gm, node.args[1].target)
            sub_inputs = [n for n in sub.graph.nodes if n.op == "placeholder"]
            passed = node.args[len(node.args) - len(sub_inputs):]
            mapping = {p: keys[a] for p, a in zip(sub_inputs, passed, strict=True)}
            out.extend(_flatten(sub, (*region, node.args[1].target), mapping))
    return out


def _tensor_meta_shape(node: torch.fx.Node) -> list[int] | None:
    value = node.meta.get("example_value")
    return list(value.shape) if isinstance(value, torch.Tensor) else None


def _param_shapes(view: list[_Node]) -> dict[str, tuple[str, list[int], int]]:
    """Parameter FQN -> (module, shape the graph reads, bytes read).

    A pass that shrinks a matmul reads a ``narrow`` view of the parameter (prune_channels); the
    view's shape is what the computation sees, so it is what counts.
    """
    consumers: dict[str, list[_Node]] = {}
    for node in view:
        if not _is_guard(node.fx):
            for key in node.inputs:
                consumers.setdefault(key, []).append(node)
    out = {}
    for node in view:
        if node.fx.op != "placeholder" or not node.module:
            continue
        value = node.fx.meta.get("example_value")
        shape, itemsize = list(value.shape), value.element_size()
        users = consumers.get(node.key, [])
        if users and all(u.fx.target is torch.narrow for u in users):
            dim = users[0].fx.args[1]  # narrow(param, dim, start, length)
            shape[dim] = max(int(u.fx.args[3]) for u in users)
        out[node.key] = (node.module, shape, int(torch.Size(shape).numel()) * itemsize)
    return out


def _describe(node: _Node, shapes: dict[str, list[int]]) -> str:
    def short(key: str) -> str:
        # Parameters by their last two names (``q_proj.weight``), other nodes by op and occurrence.
        return key.rsplit(":", 1)[-1] if ":" in key else ".".join(key.rsplit(".", 2)[-2:])

    if node.fx.op == "get_attr":
        return f"get_attr {node.fx.target}"
    args = ", ".join(short(k) for k in node.inputs[:4]) + (", ..." if len(node.inputs) > 4 else "")
    shape = shapes.get(node.key) or _tensor_meta_shape(node.fx)
    return f"{node.op}({args})" + (f" -> {tuple(shape)}" if shape is not None else "")


# ----------------------------------------------------------------------------- running graphs


class _Recorder(torch.fx.Interpreter):
    """Runs a graph recording each stamped node's tensor value and FLOPs, inside guard regions too."""

    def __init__(self, gm: torch.fx.GraphModule, values: dict[str, torch.Tensor], flops: Counter) -> None:
        super().__init__(gm)
        self.values, self.flops = values, flops

    def run_node(self, n: torch.fx.Node) -> Any:
        origin = n.meta.get(ORIGIN_KEY)
        if n.op in ("placeholder", "output", "get_attr") or origin is None or _is_guard(n):
            # A guard's own region nodes are counted one by one; counting the call too would double them.
            out = super().run_node(n)
        else:
            with _CountFlops() as mode:
                out = super().run_node(n)
            self.flops[origin["key"]] += mode.total
        if origin is not None and n.op != "placeholder" and isinstance(out, torch.Tensor):
            self.values[origin["key"]] = out.detach()
        return out

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if target in GUARDS:
            cid, region, *rest = args
            args = (cid, lambda *a: _Recorder(region, self.values, self.flops).run(*a), *rest)
        return super().call_function(target, args, kwargs)


@dataclass
class _Run:
    values: dict[str, torch.Tensor]
    flops: Counter


@torch.no_grad()
def _run(gm: torch.fx.GraphModule, inputs: list, task: str | None, step: int, calls: int) -> _Run:
    """Values and FLOPs of model call ``step`` of a fresh request; earlier calls set the guards' state."""
    values: dict[str, torch.Tensor] = {}
    flops: Counter = Counter()
    if task is None:
        _Recorder(gm, values, flops).run(*inputs)
        return _Run(values, flops)
    with request(task, calls) as req:
        for _ in range(step - 1):
            req.advance()
            if has_guards(gm):  # only guards keep state between calls
                gm(*inputs)
        req.advance()
        _Recorder(gm, values, flops).run(*inputs)
    return _Run(values, flops)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    if not a.any() and not b.any():
        return 1.0
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def _divergence(original: list[_Node], ref: _Run, view: list[_Node], got: _Run, step: int, tolerance: float,
                earlier: set[str]) -> Divergence:
    """Matched nodes of ``view`` against the unrewritten graph; ``earlier`` diverged after the previous pass."""
    order = {node.key: i for i, node in enumerate(original)}
    modules = {node.key: node.module for node in original}
    pairs = []
    for node in view:
        # A node a pass put in place of another (a guard for a layer's output) is compared with that one.
        ref_key = node.key if node.key in order else node.replaces
        if ref_key in order and ref_key in ref.values and node.key in got.values:
            pairs.append((order[ref_key], ref_key, node.key))
    result = Divergence(step, tolerance, 0, 0, 0, None)
    for _, ref_key, key in sorted(pairs):
        want, have = ref.values[ref_key], got.values[key]
        if not (want.is_floating_point() and have.is_floating_point()):
            continue
        result.compared += 1
        entry = NodeDivergence(ref_key, modules[ref_key], list(want.shape), list(have.shape), None, None, False)
        if want.shape != have.shape:
            result.shape_changed += 1
        else:
            entry.max_abs = float((have.double() - want.double()).abs().max()) if want.numel() else 0.0
            entry.cosine = _cosine(want, have)
            scale = float(want.abs().max()) if want.numel() else 0.0
            entry.diverges = entry.max_abs > tolerance * max(scale, 1e-6)
            if entry.diverges:
                result.diverging += 1
                result.first = result.first or entry
                if ref_key not in earlier:
                    result.first_new = result.first_new or entry
        result.nodes.append(entry)
    return result


# ----------------------------------------------------------------------------- guards in words


def _steps(steps: list[int], limit: int = 8) -> str:
    if not steps:
        return "none"
    shown = ", ".join(map(str, steps[:limit]))
    return f"{shown}, ... ({len(steps)} in all)" if len(steps) > limit else shown


def _describe_guard(node: _Node, task: str, calls: int, moved: dict[str, int]) -> GuardInfo:
    region_info = node.fx.meta.get("flashu_region", {})
    kind = node.fx.target.__name__
    cid = node.fx.args[0]
    ctl = controller(cid)
    rules = ctl.rules
    full = [s for s in range(1, calls + 1) if ctl.phased and rules.full_phase(s, calls)]
    full_text = f"the full network runs from call {full[0]} (final phase)" if full else "there is no full-network phase"
    shape = node.fx.meta.get("example_value")
    shape_text = tuple(shape.shape) if isinstance(shape, torch.Tensor) else "unknown"
    info = GuardInfo(kind, str(node.fx.args[1].target), node.module, region_info.get("nodes", sum(moved.values())),
                     moved, "", "", "")
    if kind == "layer_guard":
        index = node.fx.args[2]
        info.reads = (f"the {task} request's step state of controller {cid}: step index, phase, the importance "
                      f"measured for layer {index} and the skip set")
        skipping = f"skips the layer when it is among the {ctl.num_skipped} least important of {ctl.num_layers}"
        if task == "mmu":
            info.refresh = (f"measures 1 - cos(h_in, h_out) at the last token in the prefill (call 1); every decoded "
                            f"token then {skipping} (layer 0 always runs); "
                            "a skipped layer appends no K/V")
        else:
            measure = [s for s in range(1, calls + 1) if rules.recalculate(s) and s not in full]
            info.refresh = (f"over a {calls}-call request: measures 1 - cos(h_in, h_out) on calls {_steps(measure)} "
                            f"(every {rules.skip_interval}); in between, {skipping}; {full_text}")
        info.shapes = f"none: a skipped layer returns its input stream {shape_text} unchanged"
    elif kind == "memo_guard":
        key = node.fx.args[2]
        actions, have, was_full = {}, False, False
        for s in range(1, calls + 1):
            # The same rules the controller applies; the memo is dropped when the phase changes.
            if (s in full) != was_full:
                have, was_full = False, s in full
            actions[s] = "full" if s in full else rules.head_action(s, have)
            have = have or actions[s] == "store"
        by = {a: [s for s, b in actions.items() if b == a] for a in ("store", "reuse", "compute")}
        info.reads = (f"the {task} request's memo {key!r} of controller {cid} and the shapes of the region's "
                      f"inputs (a batch change, e.g. guidance switching off, invalidates it)")
        info.refresh = (f"over a {calls}-call request ({rules.semantics} rules, every {rules.cache_interval}): "
                        f"stores on calls {_steps(by['store'])}; reuses on {len(by['reuse'])} calls, computes "
                        f"without storing on {len(by['compute'])}; {full_text}")
        info.shapes = (f"none: the memo holds the region's output {shape_text}; on a reuse call its "
                       f"{info.nodes} nodes do not run")
    elif kind == "prefix_guard":
        prefix = node.fx.meta["flashu_prefix_cache"]
        seq, span = prefix["sequence"]
        info.reads = (f"the {task} request's memo {node.fx.args[2]!r} of controller {cid}, one entry per shape of the "
                      "region's inputs (guidance switching off halves the batch: each batch keeps its own)")
        info.refresh = (f"over a {calls}-call request: runs the prefix window on the first call of each batch size "
                        f"and reuses its keys/values on every later call; {full_text}")
        info.shapes = (f"sequence {seq} -> {span} after the LLM's input: every layer and flow-head block runs on each "
                       f"row's image span (time token + image tokens, gathered at the row's offset); its "
                       f"{prefix['attentions']} attentions read [the cached window of {prefix['window']} positions, "
                       f"masked past the row's prefix ; the span]; eoi, eos and padding are never computed; "
                       f"the memo holds {prefix['kv_bytes_per_row'] / 2**10:.1f} KiB of keys/values per row")
    else:
        info.reads = info.refresh = f"{kind} has no description in graph-diff"
        info.shapes = f"output {shape_text}"
    return info


# ----------------------------------------------------------------------------- per-pass comparison


def _module_changes(before: list[_Node], after: list[_Node], run_b: _Run, run_a: _Run) -> list[ModuleChange]:
    b_keys, a_keys = {n.key: n for n in before}, {n.key: n for n in after}
    shapes_b = {k: list(v.shape) for k, v in run_b.values.items()}
    shapes_a = {k: list(v.shape) for k, v in run_a.values.items()}
    modules: dict[str, ModuleChange] = {}

    def entry(path: str) -> ModuleChange:
        return modules.setdefault(path, ModuleChange(path or "<top>"))

    for node in after:
        old = b_keys.get(node.key)
        if node.fx.op == "placeholder":
            continue
        if old is None:
            entry(node.module).added.append(NodeChange(node.key, node.op, None, _describe(node, shapes_a),
                                                       node.replaces))
        elif old.inputs != node.inputs or _provenance(node) != _provenance(old):
            # Moving into an outlined region alone is not a change of the node: the region's guard reports it.
            entry(node.module).replaced.append(NodeChange(node.key, node.op, _describe(old, shapes_b),
                                                          _describe(node, shapes_a)))
        elif node.key in shapes_a and shapes_b.get(node.key) != shapes_a[node.key]:
            entry(node.module).reshaped.append(NodeChange(node.key, node.op, _describe(old, shapes_b),
                                                          _describe(node, shapes_a)))
    for node in before:
        if node.key not in a_keys and node.fx.op != "placeholder":
            entry(node.module).removed.append(NodeChange(node.key, node.op, _describe(node, shapes_b), None))

    params_b, params_a = _param_shapes(before), _param_shapes(after)
    for key, (module, shape, size) in params_b.items():
        _, new_shape, new_size = params_a.get(key, (module, [], 0))
        if new_shape != shape:
            entry(module).params.append(ParamChange(key, shape, new_shape, size, new_size))

    flops_b, flops_a = _flops_by_module(before, run_b), _flops_by_module(after, run_a)
    for path in set(flops_b) | set(flops_a):
        if flops_b.get(path, 0) != flops_a.get(path, 0):
            entry(path)
    for path, change in modules.items():
        change.flops_before, change.flops_after = flops_b.get(path, 0), flops_a.get(path, 0)
    order = {n.module: i for i, n in enumerate(before)}
    order.update({n.module: len(before) + i for i, n in enumerate(after) if n.module not in order})
    return sorted(modules.values(), key=lambda m: (order.get(m.path, len(order)), m.path))


def _provenance(node: _Node) -> dict | None:
    return node.fx.meta.get(PROVENANCE_KEY)


def _flops_by_module(view: list[_Node], run: _Run) -> dict[str, int]:
    out: Counter = Counter()
    for node in view:
        out[node.module] += run.flops.get(node.key, 0)
    return {k: v for k, v in out.items() if v}


def _describe_token_drop(node: _Node, nodes: int) -> GuardInfo:
    info = node.fx.meta["flashu_token_drop"]
    seq, kept = info["sequence"]
    return GuardInfo(
        "token_drop", "-", info["after_layer"], nodes, {},
        reads=f"the value vectors of {info['after_layer']} (v_proj output: L2 over head_dim, mean over KV heads) "
              f"at the {info['visual_tokens']} positions the prompt marks as image tokens",
        refresh="every prefill: no state, the kept positions are computed from each prompt in the graph",
        shapes=f"sequence {seq} -> {kept} after {info['after_layer']}: drops the {info['dropped']} image tokens with "
               f"the {info['order']} norm; the residual stream, rotary tables and mask are gathered to the "
               f"survivors, later layers cache {kept} positions")


def _guards(before: list[_Node], after: list[_Node], task: str, calls: int) -> list[GuardInfo]:
    old = {n.key for n in before}
    drops = [n for n in after if "flashu_token_drop" in n.fx.meta and n.key not in old]
    if drops:
        made = sum(1 for n in after if n.key not in old and (_provenance(n) or {}).get("pass") == "token_drop")
        return [_describe_token_drop(n, made) for n in drops]
    added = [n for n in after if _is_guard(n.fx) and n.key not in old]
    regions = {str(n.fx.args[1].target) for n in added}
    b_regions = {n.key: n.region for n in before}
    moved: dict[str, Counter] = {r: Counter() for r in regions}
    for node in after:
        # Nodes moved into a region, or made inside it by the pass (prefix_cache's window run).
        if node.region != b_regions.get(node.key, ()):
            region = next((r for r in node.region if r in regions), None)
            if region is not None:
                moved[region][node.module or "<top>"] += 1
    return [_describe_guard(n, task, calls, dict(moved[str(n.fx.args[1].target)])) for n in added]


# ----------------------------------------------------------------------------- capture


@dataclass
class _Snapshot:
    gm: torch.fx.GraphModule
    view: list[_Node]
    record: PassRecord | None = None  # None for the captured graph


@dataclass
class _Capture:
    inputs: list
    snapshots: list[_Snapshot] = field(default_factory=list)
    task: str | None = None
    names: dict[str, dict] = field(default_factory=dict)  # node name -> origin, as the running pass saw them
    program: Callable | None = None

    def observe(self, name: str, when: str, gm: torch.fx.GraphModule, context: PassContext,
                record: PassRecord | None) -> None:
        self.task = context.task
        if when == "before":
            self.names = {n.name: n.meta[ORIGIN_KEY] for n in gm.graph.nodes}
            return
        _stamp_new(gm, name, self.names)
        copy = _copy(gm)  # later passes erase nodes of the live graph
        self.snapshots.append(_Snapshot(copy, _flatten(copy), record))


def _copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    # Passes rewrite the graph in place; outlined regions are never changed once made, so they are shared.
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return torch.fx.GraphModule(gm, graph)


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
        _stamp_captured(gm)
        copy = _copy(gm)
        taken = _Capture(list(inputs), [_Snapshot(copy, _flatten(copy))])
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
    shown = {f.name: getattr(opts, f.name) for f in fields(opts) if f.name != "plan"}
    shown["plan"] = None if opts.plan is None else (str(opts.plan) if isinstance(opts.plan, (str, Path)) else "given")
    return GraphDiff(shown, step, calls, tolerance, graphs, recompiles, compile_seconds)


def _graph_report(index: int, capture: _Capture, step: int, run_calls: int, calls: int,
                  tolerance: float) -> GraphReport:
    runs = [_run(s.gm, capture.inputs, capture.task, step, run_calls) for s in capture.snapshots]
    original = capture.snapshots[0]
    params = _param_shapes(original.view)
    passes: list[PassDiff] = []
    diverged: set[str] = set()
    for i, snap in enumerate(capture.snapshots[1:], start=1):
        prev, record = capture.snapshots[i - 1], snap.record
        pb, pa = _param_shapes(prev.view), _param_shapes(snap.view)
        passes.append(PassDiff(
            record.name, record.changed, record.seconds, record.stats, record.skipped_reason,
            len(prev.view), len(snap.view), sum(v[2] for v in pb.values()), sum(v[2] for v in pa.values()),
            sum(runs[i - 1].flops.values()), sum(runs[i].flops.values()),
            _module_changes(prev.view, snap.view, runs[i - 1], runs[i]),
            _guards(prev.view, snap.view, capture.task, calls),
            _divergence(original.view, runs[0], snap.view, runs[i], step, tolerance, diverged)
            if record.changed else None,
        ))
        if passes[-1].divergence is not None:
            diverged = {n.node for n in passes[-1].divergence.nodes if n.diverges}
    return GraphReport(index, capture.task, len(original.view), sum(v[2] for v in params.values()),
                       sum(runs[0].flops.values()), passes)


def to_json(diff: GraphDiff) -> str:
    return json.dumps(diff.to_json(), indent=1)


# ----------------------------------------------------------------------------- command line


def sample_call(model, task: str, prompt: str, question: str, seed: int) -> tuple[Callable, tuple]:
    """The entry point graph-diff compiles for ``task`` and one example input for it."""
    from transformers import DynamicCache

    from ..models.showo2 import understanding
    from ..models.showo2.sequences import t2i_rows

    cfg = model.config
    generator = torch.Generator().manual_seed(seed)
    if task == "t2i":
        rows = t2i_rows(model.tokenizer, [prompt], cfg.num_image_tokens, cfg.max_text_len, guidance=True)
        latents = torch.randn(2, cfg.image_latent_dim, *cfg.latent_size, generator=generator)
        return model.denoise, (rows.text_tokens, latents, torch.full((2,), 0.4), rows.attention_mask,
                               rows.modality_positions)
    image = torch.randn(1, cfg.image_latent_dim, *cfg.latent_size, generator=generator)
    rows, embeds = understanding.prepare(model, model.tokenizer, image, question)

    def prefill(embeds: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # A new cache per call: graph-diff calls the function more than once with the same inputs.
        return understanding.prefill(model, embeds, attention_mask, DynamicCache(config=cfg.llm), positions)

    return prefill, (embeds, rows.attention_mask, rows.image_positions())


def cmd_graph_diff(args: argparse.Namespace) -> int:
    from ..validate import MAX_SEED, MAX_STEPS, check_float, check_int
    from .common import check_output, load_model, parse_option
    from .graph_diff_render import render_html, render_terminal

    steps = check_int("--steps", args.steps, 2, MAX_STEPS)
    check_int("--step", args.step, 1, steps - 1)  # a model call of the request: steps - 1 of them
    check_float("--tolerance", args.tolerance, 0.0, low_open=True)
    check_int("--seed", args.seed, 0, MAX_SEED)
    if args.out:
        check_output("--out", args.out, folder=False)
    options: dict[str, Any] = {"preset": args.preset, "task": args.task}
    if args.passes is not None:
        options["passes"] = args.passes
    options.update(parse_option(o) for o in args.option)
    opts = FlashUOptions.from_dict(options)  # bad options and passes fail here, before the model loads
    build_pass_list(opts)
    torch.manual_seed(args.seed)
    model = load_model(args)
    log = sys.stderr
    print(f"model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters)", file=log)
    if args.plan:
        options["plan"] = args.plan
    elif "prune_channels" in opts.passes:
        from ..calibrate import calibrate

        t0 = time.perf_counter()
        options["plan"] = calibrate(model, steps=3, progress=False)
        print(f"calibrated a plan in {time.perf_counter() - t0:.1f} s ({options['plan'].summary()}); "
              f"--plan DIR reuses a saved one", file=log)
    fn, inputs = sample_call(model, args.task, args.prompt, args.question, args.seed)
    diff = graph_diff(fn, inputs, options, step=args.step, calls=args.steps - 1, tolerance=args.tolerance)
    title = args.command_line
    if args.format == "json":
        text = to_json(diff)
    elif args.format == "html":
        text = render_html(diff, title)
    else:
        color = not args.no_color and args.out is None and sys.stdout.isatty()
        text = render_terminal(diff, title, color=color)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"-> {args.out}", file=log)
    else:
        print(text)
    return 0


def add_parser(sub) -> None:
    """Register the ``graph-diff`` subcommand on the ``flashu-compile`` subparsers ``sub``."""
    from .common import model_args

    p = sub.add_parser("graph-diff", help="what every flashu pass did to the graph: modules, shapes, FLOPs, "
                       "guards, numeric divergence", description=__doc__.split("\n\n")[0])
    model_args(p)
    p.add_argument("--preset", default="paper", help="flashu options preset (off, paper, flashu-reference)")
    p.add_argument("--passes", nargs="*", metavar="PASS", help="passes to run (default: the preset's)")
    p.add_argument("--option", "-O", action="append", default=[], metavar="KEY=VALUE",
                   help="any other flashu option, value as JSON (e.g. -O skip_ratio=0.5); repeatable")
    p.add_argument("--plan", help="a saved calibration plan (default: calibrate when prune_channels runs)")
    p.add_argument("--task", choices=("t2i", "mmu"), default="t2i",
                   help="t2i: a denoising step; mmu: an understanding prefill")
    p.add_argument("--prompt", default="a red circle left of a blue square")
    p.add_argument("--question", default="what colour is the circle?")
    p.add_argument("--steps", type=int, default=50, help="time-grid points of the request guards are described for")
    p.add_argument("--step", type=int, default=2,
                   help="the model call the numeric comparison runs as (earlier calls set the guards' state)")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="a node diverges when max-abs exceeds this times the unrewritten value's largest magnitude")
    p.add_argument("--format", choices=("term", "json", "html"), default="term")
    p.add_argument("--out", help="write to this file instead of standard output")
    p.add_argument("--no-color", action="store_true", help="plain text even on a terminal")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_graph_diff)
