"""Outline a region of an FX graph into a submodule called through a guard op.

The region's nodes move into a child GraphModule (parameters stay placeholders, so no weight is
copied); in their place the parent gets ``guard(controller_id, <submodule>, *consts, *inputs)``.
Lowerings compile the child on its own and run the guard in Python between compiled segments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch.fx
from torch.fx.passes.utils.fuser_utils import fuse_as_graphmodule, topo_sort

from ..passes.manager import tag


def outline(
    gm: torch.fx.GraphModule,
    nodes: Iterable[torch.fx.Node],
    name: str,
    guard: Callable,
    consts: tuple,
    pass_name: str,
    first_input: torch.fx.Node | None = None,
) -> torch.fx.Node:
    """Replace ``nodes`` (one output) by a guard call; ``first_input`` is moved to the front of the inputs.

    ``consts`` starts with the controller id; the rest are passed between the submodule and the inputs.
    """
    region = topo_sort(list(dict.fromkeys(nodes)))
    sub, inputs, outputs = fuse_as_graphmodule(gm, region, name)
    if len(outputs) != 1:
        raise ValueError(f"region {name} has {len(outputs)} outputs; only single-output regions can be guarded")
    inputs = list(inputs)
    if first_input is not None:
        if first_input not in inputs:
            raise ValueError(f"region {name} does not read {first_input.name}")
        # Reorder the child's placeholders to match, so the guard can find the stream at position 0.
        position = inputs.index(first_input)
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        if position:
            placeholders[0].prepend(placeholders[position])
            sub.recompile()
        inputs.insert(0, inputs.pop(position))
    gm.add_submodule(name, sub)
    (output,) = outputs
    with gm.graph.inserting_after(output):
        attr = gm.graph.get_attr(name)
    with gm.graph.inserting_after(attr):
        # guard(controller_id, submodule, *other constants, *region inputs)
        call = gm.graph.call_function(guard, (consts[0], attr, *consts[1:], *inputs))
    tag(attr, pass_name)
    tag(call, pass_name, replaces=output.name)
    call.meta["example_value"] = output.meta.get("example_value")
    call.meta["flashu_region"] = {"name": name, "nodes": len(region), "guard": guard.__name__}
    output.replace_all_uses_with(call)
    for node in reversed(region):
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return call
