"""Origin keys: how graph-diff names a node across snapshots, and the flat view of a graph with its regions.

Generated node names change between traces and when a pass outlines a region, so every node of
the captured graph is stamped with an origin key (module path, op, occurrence), node copies carry
it into outlined regions, and a node a pass creates is keyed by its module, the pass and its op,
and linked to the node it stands for (``meta["flashu_pass"]["replaces"]``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx

from ...graph.structure import module_path
from ...passes.manager import PROVENANCE_KEY
from ...runtime.guards import GUARDS

ORIGIN_KEY = "flashu_origin"  # node.meta entry graph-diff stamps: {"key", "module", "replaces"}
_PARAM = re.compile(r"_parameters_(?P<name>.+)_$")


def op_name(node: torch.fx.Node) -> str:
    if node.op in ("call_function", "call_method"):
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def is_guard(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in GUARDS


def stamp_captured(gm: torch.fx.GraphModule) -> None:
    """Key every node of a freshly captured graph by module path, op and occurrence."""
    seen: Counter = Counter()
    for position, node in enumerate(gm.graph.nodes):
        module = module_path(node) or ""
        if node.op == "placeholder":
            param = _PARAM.search(str(node.target))
            key = f"{module}.{param.group('name')}" if param and module else f"input#{position}"
            node.meta[ORIGIN_KEY] = {"key": key, "module": module if param else "", "replaces": None}
            continue
        op = op_name(node)
        key = f"{module}:{op}#{seen[module, op]}"
        seen[module, op] += 1
        node.meta[ORIGIN_KEY] = {"key": key, "module": module, "replaces": None}


def with_regions(gm: torch.fx.GraphModule) -> list[torch.fx.GraphModule]:
    """``gm`` and every region its guards call, nested ones included."""
    out = [gm]
    for node in gm.graph.nodes:
        if is_guard(node):
            out.extend(with_regions(getattr(gm, node.args[1].target)))
    return out


def stamp_new(gm: torch.fx.GraphModule, pass_name: str, by_name: dict[str, dict]) -> None:
    """Key the nodes ``pass_name`` created, from the node each stands for or else its first user.

    A pass may create nodes and outline them in one go (``prefix_cache``): regions are searched too.
    """
    fresh = [n for g in with_regions(gm) for n in g.graph.nodes if ORIGIN_KEY not in n.meta]
    replaced = {n: by_name.get((n.meta.get(PROVENANCE_KEY) or {}).get("replaces")) for n in fresh}
    modules = {n: origin["module"] for n, origin in replaced.items() if origin is not None}
    for node in reversed(fresh):  # a region's get_attr precedes the guard call that names its module
        if node not in modules:
            users = [u.meta.get(ORIGIN_KEY, {}).get("module") or modules.get(u) for u in node.users]
            modules[node] = next((m for m in users if m), "")
    seen: Counter = Counter()
    for node in fresh:
        module, op = modules[node], f"{pass_name}.{op_name(node)}"
        node.meta[ORIGIN_KEY] = {"key": f"{module}:{op}#{seen[module, op]}", "module": module,
                                 "replaces": replaced[node]["key"] if replaced[node] else None}
        seen[module, op] += 1


@dataclass
class ViewNode:
    key: str
    module: str
    op: str
    fx: torch.fx.Node
    inputs: list[str]  # origin keys, region placeholders resolved to what the guard passes in
    region: tuple[str, ...]  # enclosing outlined regions, outermost first
    replaces: str | None


def flatten(gm: torch.fx.GraphModule, region: tuple[str, ...] = (),
             outer: dict[torch.fx.Node, str] | None = None) -> list[ViewNode]:
    """Every node of a graph and of the regions its guards call, in execution order."""
    keys: dict[torch.fx.Node, str] = {}
    out: list[ViewNode] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder" and outer is not None:
            keys[node] = outer[node]
            continue
        if node.op == "output":
            continue
        origin = node.meta[ORIGIN_KEY]
        keys[node] = origin["key"]
        inputs = [keys[a] for a in node.all_input_nodes]
        out.append(ViewNode(origin["key"], origin["module"], op_name(node), node, inputs, region, origin["replaces"]))
        if is_guard(node):
            sub = getattr(gm, node.args[1].target)
            sub_inputs = [n for n in sub.graph.nodes if n.op == "placeholder"]
            passed = node.args[len(node.args) - len(sub_inputs):]
            mapping = {p: keys[a] for p, a in zip(sub_inputs, passed, strict=True)}
            out.extend(flatten(sub, (*region, node.args[1].target), mapping))
    return out


def tensor_meta_shape(node: torch.fx.Node) -> list[int] | None:
    value = node.meta.get("example_value")
    return list(value.shape) if isinstance(value, torch.Tensor) else None


def param_shapes(view: list[ViewNode]) -> dict[str, tuple[str, list[int], int]]:
    """Parameter FQN -> (module, shape the graph reads, bytes read).

    A pass that shrinks a matmul reads a ``narrow`` view of the parameter (prune_channels); the
    view's shape is what the computation sees, so it is what counts.
    """
    consumers: dict[str, list[ViewNode]] = {}
    for node in view:
        if not is_guard(node.fx):
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


def describe_node(node: ViewNode, shapes: dict[str, list[int]]) -> str:
    def short(key: str) -> str:
        # Parameters by their last two names (``q_proj.weight``), other nodes by op and occurrence.
        return key.rsplit(":", 1)[-1] if ":" in key else ".".join(key.rsplit(".", 2)[-2:])

    if node.fx.op == "get_attr":
        return f"get_attr {node.fx.target}"
    args = ", ".join(short(k) for k in node.inputs[:4]) + (", ..." if len(node.inputs) > 4 else "")
    shape = shapes.get(node.key) or tensor_meta_shape(node.fx)
    return f"{node.op}({args})" + (f" -> {tuple(shape)}" if shape is not None else "")
