"""Running a snapshot: every stamped node's value and FLOPs at one model call, and divergence between two runs."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from ...graph.rewrite import has_guards
from ...runtime.flops import _CountFlops
from ...runtime.guards import GUARDS
from ...runtime.request import request
from .nodes import ORIGIN_KEY, ViewNode, is_guard
from .report import Divergence, NodeDivergence


class Recorder(torch.fx.Interpreter):
    """Runs a graph recording each stamped node's tensor value and FLOPs, inside guard regions too."""

    def __init__(self, gm: torch.fx.GraphModule, values: dict[str, torch.Tensor], flops: Counter) -> None:
        super().__init__(gm)
        self.values, self.flops = values, flops

    def run_node(self, n: torch.fx.Node) -> Any:
        origin = n.meta.get(ORIGIN_KEY)
        if n.op in ("placeholder", "output", "get_attr") or origin is None or is_guard(n):
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
            args = (cid, lambda *a: Recorder(region, self.values, self.flops).run(*a), *rest)
        return super().call_function(target, args, kwargs)


@dataclass
class Run:
    values: dict[str, torch.Tensor]
    flops: Counter


@torch.no_grad()
def run(gm: torch.fx.GraphModule, inputs: list, task: str | None, step: int, calls: int) -> Run:
    """Values and FLOPs of model call ``step`` of a fresh request; earlier calls set the guards' state."""
    values: dict[str, torch.Tensor] = {}
    flops: Counter = Counter()
    if task is None:
        Recorder(gm, values, flops).run(*inputs)
        return Run(values, flops)
    with request(task, calls) as req:
        for _ in range(step - 1):
            req.advance()
            if has_guards(gm):  # only guards keep state between calls
                gm(*inputs)
        req.advance()
        Recorder(gm, values, flops).run(*inputs)
    return Run(values, flops)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    if not a.any() and not b.any():
        return 1.0
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def divergence(original: list[ViewNode], ref: Run, view: list[ViewNode], got: Run, step: int, tolerance: float,
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
            entry.cosine = cosine(want, have)
            scale = float(want.abs().max()) if want.numel() else 0.0
            entry.diverges = entry.max_abs > tolerance * max(scale, 1e-6)
            if entry.diverges:
                result.diverging += 1
                result.first = result.first or entry
                if ref_key not in earlier:
                    result.first_new = result.first_new or entry
        result.nodes.append(entry)
    return result
