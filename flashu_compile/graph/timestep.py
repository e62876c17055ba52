"""Find what tells a denoising graph's requests apart among its inputs: the flow time ``t`` and the conditioning.

A compiled denoising step called from a user's own loop learns where a request starts from
``t`` (it grows from 0 to 1 over a request's calls), so the program must know which input it
is. It is the one floating input of at most one dimension that is not a weight and reaches the
time embedding within a few ops; anything else yields None, never a guess.

Which request a call belongs to comes from its conditioning: the tensors the caller passes that
stay the same over a request's steps (text rows, attention mask, span positions), that is, the
caller's own tensor inputs other than ``t`` and the latent state (shaped like the output).
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


def _is_callers_input(node: torch.fx.Node) -> bool:
    """Whether dynamo took the placeholder from the traced call's arguments (``L['x']``, ``L['args'][0]``), not
    from a module's parameters or buffers (``L['self']._modules[...]``)."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", None)
    name = name() if callable(name) else name  # a method in older torch releases
    return isinstance(name, str) and name.startswith("L[") and "." not in name


def _shape_text(node: torch.fx.Node) -> str | None:
    # As text: symbolic sizes (s0) compare by name without guarding on them, and SymInts are not hashable.
    value = node.meta.get("example_value")
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else None


def conditioning_inputs(gm: torch.fx.GraphModule, example_inputs: list, timestep: int | None) -> tuple[int, ...]:
    """Positions of the conditioning among the graph's inputs: the caller's tensors other than ``t`` and those
    shaped like an output (the latent the step advances). Empty when dynamo recorded no input sources."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    out_shapes = {_shape_text(a) for a in output.all_input_nodes} - {None}
    return tuple(i for i, (node, value) in enumerate(zip(placeholders, example_inputs, strict=False))
                 if i != timestep and isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter)
                 and _is_callers_input(node) and _shape_text(node) not in out_shapes)
