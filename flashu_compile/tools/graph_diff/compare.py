"""One pass's changes: per module (nodes, parameter shapes, FLOPs) and, in words, what the nodes it made do.

The words come from each pass's ``describe`` hook in the pass registry; a guard whose pass has none
is listed with a placeholder.
"""

from __future__ import annotations

from collections import Counter

from ...passes.manager import PROVENANCE_KEY
from ...passes.registry import REGISTRY, DescribeContext, shape_text
from .interpret import Run
from .nodes import ViewNode, describe_node, is_guard, param_shapes
from .report import GuardInfo, ModuleChange, NodeChange, ParamChange


def module_changes(before: list[ViewNode], after: list[ViewNode], run_b: Run, run_a: Run) -> list[ModuleChange]:
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
            entry(node.module).added.append(NodeChange(node.key, node.op, None, describe_node(node, shapes_a),
                                                       node.replaces))
        elif old.inputs != node.inputs or provenance(node) != provenance(old):
            # Moving into an outlined region alone is not a change of the node: the region's guard reports it.
            entry(node.module).replaced.append(NodeChange(node.key, node.op, describe_node(old, shapes_b),
                                                          describe_node(node, shapes_a)))
        elif node.key in shapes_a and shapes_b.get(node.key) != shapes_a[node.key]:
            entry(node.module).reshaped.append(NodeChange(node.key, node.op, describe_node(old, shapes_b),
                                                          describe_node(node, shapes_a)))
    for node in before:
        if node.key not in a_keys and node.fx.op != "placeholder":
            entry(node.module).removed.append(NodeChange(node.key, node.op, describe_node(node, shapes_b), None))

    params_b, params_a = param_shapes(before), param_shapes(after)
    for key, (module, shape, size) in params_b.items():
        _, new_shape, new_size = params_a.get(key, (module, [], 0))
        if new_shape != shape:
            entry(module).params.append(ParamChange(key, shape, new_shape, size, new_size))

    flops_b, flops_a = flops_by_module(before, run_b), flops_by_module(after, run_a)
    for path in set(flops_b) | set(flops_a):
        if flops_b.get(path, 0) != flops_a.get(path, 0):
            entry(path)
    for path, change in modules.items():
        change.flops_before, change.flops_after = flops_b.get(path, 0), flops_a.get(path, 0)
    order = {n.module: i for i, n in enumerate(before)}
    order.update({n.module: len(before) + i for i, n in enumerate(after) if n.module not in order})
    return sorted(modules.values(), key=lambda m: (order.get(m.path, len(order)), m.path))


def provenance(node: ViewNode) -> dict | None:
    return node.fx.meta.get(PROVENANCE_KEY)


def flops_by_module(view: list[ViewNode], run: Run) -> dict[str, int]:
    out: Counter = Counter()
    for node in view:
        out[node.module] += run.flops.get(node.key, 0)
    return {k: v for k, v in out.items() if v}


def guards(before: list[ViewNode], after: list[ViewNode], task: str, calls: int) -> list[GuardInfo]:
    """The nodes a pass made, in words: each new guard call, and each other new node its pass's hook describes."""
    old = {n.key for n in before}
    new = [n for n in after if n.key not in old]
    regions = {str(n.fx.args[1].target) for n in new if is_guard(n.fx)}
    b_regions = {n.key: n.region for n in before}
    moved: dict[str, Counter] = {r: Counter() for r in regions}
    for node in after:
        # Nodes moved into a region, or made inside it by the pass (prefix_cache's window run).
        if node.region != b_regions.get(node.key, ()):
            region = next((r for r in node.region if r in regions), None)
            if region is not None:
                moved[region][node.module or "<top>"] += 1
    made = Counter((provenance(n) or {}).get("pass") for n in new)
    out = []
    for node in new:
        name = (provenance(node) or {}).get("pass")
        spec = REGISTRY.get(name)
        if is_guard(node.fx):
            region = str(node.fx.args[1].target)
            kind = node.fx.target.__name__
            nodes = node.fx.meta.get("flashu_region", {}).get("nodes", sum(moved[region].values()))
            info = GuardInfo(kind, region, node.module, nodes, dict(moved[region]), "", "", "")
        else:
            info = GuardInfo(name, "-", node.module, made[name], {}, "", "", "")
        said = spec.describe(node.fx, DescribeContext(task, calls, info.nodes)) if spec and spec.describe else None
        if said is not None:
            info.reads, info.refresh, info.shapes = said.reads, said.refresh, said.shapes
            info.module = said.module or info.module
        elif is_guard(node.fx):
            info.reads = info.refresh = f"{info.kind} has no description in graph-diff"
            info.shapes = f"output {shape_text(node.fx)}"
        else:
            continue
        out.append(info)
    return out
