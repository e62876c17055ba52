"""What every rewrite of a dynamo graph shares: provenance tags, the not-applicable signal, copies,
and telling guarded graphs and symbolic values apart.

Below the passes and the lowerings, so both (and the FX utilities beside this module) use one
definition of each.
"""

from __future__ import annotations

import functools
from typing import Any

import torch.fx

from ..runtime.guards import GUARDS

# node.meta key of a node a pass created or replaced: {"pass": name, "replaces": original node's name or None}.
PROVENANCE_KEY = "flashu_pass"


class PassNotApplicable(Exception):
    """A pass found nothing it can rewrite safely in this graph; the message says why."""


class StrictModeError(RuntimeError):
    """Under ``strict=True``: a pass asked for does not act on a graph; the message names it and why."""


def tag(node: torch.fx.Node, pass_name: str, replaces: str | None = None) -> torch.fx.Node:
    """Mark a node as made by ``pass_name`` (and which original node it stands for)."""
    node.meta[PROVENANCE_KEY] = {"pass": pass_name, "replaces": replaces}
    return node


def has_guards(gm: torch.fx.GraphModule) -> bool:
    return any(n.op == "call_function" and n.target in GUARDS for n in gm.graph.nodes)


def copy_graph(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule with its own copy of ``gm``'s graph (sharing its attributes)."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return torch.fx.GraphModule(gm, graph)


def inline_call(gm: torch.fx.GraphModule, sub: torch.fx.GraphModule, args: tuple, prefix: str) -> Any:
    """Copy ``sub``'s graph into ``gm`` at its insertion point, its placeholders bound to ``args`` (nodes of ``gm``),
    and return what it returns, in ``gm``'s nodes: a call of ``sub`` made part of the graph that calls it.

    The copies keep their meta. Attributes ``sub``'s nodes read (constants, nested submodules) join ``gm`` under
    names starting with ``prefix``.
    """
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    copies: dict[torch.fx.Node, torch.fx.Node] = dict(zip(placeholders, args, strict=True))
    value = gm.graph.graph_copy(sub.graph, copies)
    for node in sub.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            name, k = f"{prefix}_{node.target.replace('.', '_')}", 0
            while hasattr(gm, name + (f"_{k}" if k else "")):
                k += 1
            copies[node].target = name + (f"_{k}" if k else "")
            setattr(gm, copies[node].target, functools.reduce(getattr, node.target.split("."), sub))
    return value


def is_symbolic(value: Any) -> bool:
    """Whether ``value`` is a SymInt or a tensor with a SymInt dimension (dynamo traced it with symbolic sizes)."""
    return isinstance(value, torch.SymInt) or (
        isinstance(value, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in value.shape))
