"""Lower a graph that contains guard ops: compiled segments in between, guards run in Python.

The graph is cut at every guard node. Each maximal run of ordinary nodes becomes a segment
lowered on its own (Inductor, TensorRT or eager); each guard's outlined region is lowered the
same way, recursively, so a region may hold guards of its own (the flow-head trunk holds the
layer guards). Segments compile lazily on their first call with the real inputs of that call.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch.fx
from torch.fx.passes.utils.fuser_utils import fuse_as_graphmodule

from ..runtime.guards import GUARDS


def has_guards(gm: torch.fx.GraphModule) -> bool:
    return any(n.op == "call_function" and n.target in GUARDS for n in gm.graph.nodes)


class LazyLowered:
    """A graph lowered on first call, with that call's arguments as example inputs."""

    def __init__(self, gm: torch.fx.GraphModule, lowering: str) -> None:
        self.gm = gm
        self.lowering = lowering
        self.fn: Callable | None = None

    def __call__(self, *args: Any) -> Any:
        if self.fn is None:
            from .registry import lower

            self.fn = lower(self.gm, list(args), self.lowering)
        return self.fn(*args)


def has_symbolic_sizes(gm: torch.fx.GraphModule) -> bool:
    """Whether dynamo traced ``gm`` with symbolic sizes (a SymInt input, or a tensor input of symbolic shape)."""
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        value = node.meta.get("example_value")
        if isinstance(value, torch.SymInt) or (
                isinstance(value, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in value.shape)):
            return True
    return False


class SegmentedProgram:
    def __init__(self, gm: torch.fx.GraphModule, lowering: str) -> None:
        if lowering != "eager" and has_symbolic_sizes(gm):
            # dynamo made a size dynamic (e.g. a growing KV cache), so later calls bring other shapes;
            # pieces compiled for the first call's shapes would reject them.
            warnings.warn(f"a guarded graph with symbolic sizes runs its pieces eagerly instead of with {lowering!r}",
                          stacklevel=2)
            lowering = "eager"
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
                self.steps.append(("guard", (node.target, cid, region), rest, [node]))
            elif node.op == "get_attr" and all(u.op == "call_function" and u.target in GUARDS for u in node.users):
                continue  # an outlined region: lowered with its guard
            else:
                run.append(node)
        self._add_segment(gm, run, lowering)
        self._plan_releases()

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
        env: dict[torch.fx.Node, Any] = dict(zip(self.placeholders, args, strict=True))
        for (kind, fn, inputs, outputs), release in zip(self.steps, self.releases, strict=True):
            values = [env[v] if isinstance(v, torch.fx.Node) else v for v in inputs]
            if kind == "segment":
                env.update(zip(outputs, fn(*values), strict=True))
            else:
                guard, cid, region = fn
                env[outputs[0]] = guard(cid, region, *values)
            for node in release:
                env.pop(node, None)
        return torch.fx.node.map_arg(self.output.args[0], env.__getitem__)
