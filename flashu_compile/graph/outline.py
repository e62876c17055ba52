"""Outline a region of an FX graph into a submodule called through a guard op.

The region's nodes move into a child GraphModule (parameters stay placeholders, so no weight is
copied); in their place the parent gets ``guard(controller_id, <submodule>, *consts, *inputs)``
(and a getitem per output when the region has several, e.g. a decoder layer that writes a KV cache).
Lowerings compile the child on its own and run the guard in Python between compiled segments.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable

import torch.fx

from ..runtime.compile_profile import profiled
from ..runtime.guards import region
from .compat import fuse_as_graphmodule, topo_sort
from .rewrite import PassNotApplicable, tag
from .structure import build_index


def region_cycle(region: Iterable[torch.fx.Node]) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """A dataflow path that leaves ``region`` and re-enters it, as (the first node outside, the node it re-enters),
    or None when the region is convex: only a convex region can become one call without a cycle.
    """
    inside = set(region)
    if not inside:
        return None
    order = {node: i for i, node in enumerate(next(iter(inside)).graph.nodes)}
    last = max(order[node] for node in inside)
    # Graph order is topological, so nothing after the region's last node can lead back into it.
    frontier = [(user, user) for node in inside for user in node.users if user not in inside and order[user] < last]
    seen = {user for user, _ in frontier}
    while frontier:
        node, exit_node = frontier.pop()
        for user in node.users:
            if user in inside:
                return exit_node, user
            if user not in seen and order[user] < last:
                seen.add(user)
                frontier.append((user, exit_node))
    return None


@profiled("outlining")
def outline(
    gm: torch.fx.GraphModule,
    nodes: Iterable[torch.fx.Node],
    name: str,
    guard: Callable,
    consts: tuple,
    pass_name: str,
    first_input: torch.fx.Node | None = None,
    carry: dict[torch.fx.Node, torch.fx.Node | None] | None = None,
) -> dict[torch.fx.Node, torch.fx.Node]:
    """Replace ``nodes`` by a guard call; returns each former output of the region -> the node now standing for it.
    The caller recompiles ``gm`` when it is done rewriting.

    Raises PassNotApplicable, before changing anything, when the region is not convex (a value computed
    from it flows back into it outside it).

    ``consts`` starts with the controller id; the rest are passed between the submodule and the
    inputs. ``first_input`` is moved to the front of the inputs. ``carry`` (for regions a guard may
    skip) maps each output to the input it equals when skipped, or None if it has none; the guard
    then gets one more constant, the input position per output (-1 for none).
    """
    region = topo_sort(list(dict.fromkeys(nodes)))
    if (cycle := region_cycle(region)) is not None:
        leaves, reenters = cycle
        raise PassNotApplicable(f"region {name} is not convex: {leaves.name} depends on the region and feeds its "
                                f"node {reenters.name}, so outlining it would create a cycle")
    sub, inputs, outputs = fuse_as_graphmodule(gm, region, name)
    inputs, outputs = list(inputs), list(outputs)
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
    if carry is not None:
        consts = (*consts, tuple(inputs.index(carry[o]) if carry.get(o) in inputs else -1 for o in outputs))
    gm.add_submodule(name, sub)
    last = max(outputs, key=list(gm.graph.nodes).index)
    with gm.graph.inserting_after(last):
        attr = gm.graph.get_attr(name)
    with gm.graph.inserting_after(attr):
        # guard(controller_id, submodule, *other constants, *region inputs)
        call = gm.graph.call_function(guard, (consts[0], attr, *consts[1:], *inputs))
    tag(attr, pass_name)
    tag(call, pass_name, replaces=last.name)
    # first_input: where the region's own inputs start in the guard's arguments.
    call.meta["flashu_region"] = {"name": name, "nodes": len(region), "guard": guard.__name__,
                                  "first_input": 1 + len(consts)}
    replacements = {}
    if len(outputs) == 1:
        call.meta["example_value"] = outputs[0].meta.get("example_value")
        replacements[outputs[0]] = call
    else:
        # The child returns a tuple: one getitem per former output.
        with gm.graph.inserting_after(call):
            for i, output in reversed(list(enumerate(outputs))):
                item = tag(gm.graph.call_function(operator.getitem, (call, i)), pass_name, replaces=output.name)
                item.meta["example_value"] = output.meta.get("example_value")
                replacements[output] = item
    for output, node in replacements.items():
        output.replace_all_uses_with(node)
    for node in reversed(region):
        gm.graph.erase_node(node)
    # ``gm``'s code is left stale: recompiling it recompiles every submodule outlined so far, so a pass
    # outlining 28 layers would pay quadratic time; whoever outlines (the pass manager after each pass,
    # outline_blocks) lints and recompiles once.
    return replacements


def outline_blocks(gm: torch.fx.GraphModule, example_inputs: list, cid: int) -> int:
    """Outline every decoder layer and flow-head block of ``gm`` (in place) as a :func:`~runtime.guards.region`
    of its own; returns how many were outlined.

    Why: a lowering then compiles each block as one piece, and blocks that differ only in their weights (which
    are inputs) compile once and hit the compile caches after, where a whole graph compiles every layer again.
    A block that cannot be outlined (not convex) stays in place; a graph the structure index does not
    understand is left whole.
    """
    index = build_index(gm, example_inputs)
    if not index.applicable:
        return 0
    done = 0
    for block in (*index.layers, *index.head_blocks):
        try:
            outline(gm, block.nodes, f"flashu_region_{block.kind}_{block.index}", region, (cid,), "regional")
        except PassNotApplicable:
            continue
        done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return done
