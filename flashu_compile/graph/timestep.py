"""Find the flow time ``t`` among a denoising graph's inputs.

A compiled denoising step called from a user's own loop learns where a request starts from
``t`` (it grows from 0 to 1 over a request's calls), so the program must know which input it
is. It is the one floating input of at most one dimension that is not a weight and reaches the
time embedding within a few ops; anything else yields None, never a guess.
"""

from __future__ import annotations

import re

import torch
import torch.fx

from .structure import module_path

TIME_EMBEDDING = re.compile(r"(^|\.)time_embed(\.|$)")
_MAX_HOPS = 6  # t is reshaped and cast before the embedding reads it, nothing more


def _reaches_time_embedding(node: torch.fx.Node) -> bool:
    frontier, seen = [node], {node}
    for _ in range(_MAX_HOPS):
        frontier = [u for n in frontier for u in n.users if u not in seen]
        seen.update(frontier)
        if any(TIME_EMBEDDING.search(module_path(u) or "") for u in frontier):
            return True
    return False


def timestep_input(gm: torch.fx.GraphModule, example_inputs: list) -> int | None:
    """Position of ``t`` among the graph's inputs, or None when no single input qualifies."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found = [i for i, (node, value) in enumerate(zip(placeholders, example_inputs, strict=False))
             if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter)
             and value.is_floating_point() and value.dim() <= 1 and _reaches_time_embedding(node)]
    return found[0] if len(found) == 1 else None
