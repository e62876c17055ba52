"""head_cache: memoize the flow-head trunk across denoising steps.

The memoized value is the output of the last ``diffusion_head_a`` block. The region outlined
behind ``runtime.guards.memo_guard`` is everything that feeds only that value: the flow-head
blocks, but also the decoder and the image embedding, since nothing else reads them in a
denoising graph. So on a reuse step neither the head blocks nor the LLM run (the public code
still runs the LLM there); only the final layer (``diffusion_head_b``) runs with the current t.
"""

from __future__ import annotations

import torch.fx

from ..graph.outline import outline
from ..options import Setting
from ..runtime.guards import controller, memo_guard
from .manager import PassContext, PassNotApplicable, PassResult
from .registry import (
    GUARD_REGION,
    BenchRow,
    DescribeContext,
    Described,
    PassSpec,
    full_calls,
    full_text,
    register,
    shape_text,
    steps_text,
)

NAME = "head_cache"


def exclusive_ancestors(gm: torch.fx.GraphModule, target: torch.fx.Node) -> list[torch.fx.Node]:
    """``target`` and every node whose results are read only (transitively) by it."""
    region = {target}
    nodes = list(gm.graph.nodes)
    for node in reversed(nodes[: nodes.index(target)]):
        if node.op in ("placeholder", "output") or not node.users:
            continue
        if all(user in region for user in node.users):
            region.add(node)
    return [n for n in nodes if n in region]


def head_cache(gm, ctx: PassContext, options) -> PassResult:
    blocks = ctx.index.head_blocks
    if not blocks:
        raise PassNotApplicable("no flow-head blocks in this graph")
    region = exclusive_ancestors(gm, blocks[-1].output)
    outline(gm, region, "flashu_head_trunk", memo_guard, (ctx.controller.id, "head"), NAME)
    return PassResult(True, {"memoized_nodes": len(region), "refresh_every": options.cache_interval})


def trunk_actions(cid: int, calls: int) -> dict[str, list[int]]:
    """What controller ``cid``'s rules do with a memoized trunk on each call of a ``calls``-call request, by
    action ("store", "reuse", "compute", "full"): the rules the guards apply, for words about them."""
    rules = controller(cid).rules
    full = full_calls(controller(cid), calls)
    actions, have, was_full = {}, False, False
    for s in range(1, calls + 1):
        # The memo is dropped when the phase changes.
        if (s in full) != was_full:
            have, was_full = False, s in full
        actions[s] = "full" if s in full else rules.head_action(s, have)
        have = have or actions[s] == "store"
    return {a: [s for s, b in actions.items() if b == a] for a in ("store", "reuse", "compute", "full")}


def describe(node: torch.fx.Node, request: DescribeContext) -> Described | None:
    if node.target is not memo_guard:
        return None
    cid, key = node.args[0], node.args[2]
    rules = controller(cid).rules
    by = trunk_actions(cid, request.calls)
    full = by["full"]
    return Described(
        reads=(f"the {request.task} request's memo {key!r} of controller {cid} and the shapes of the region's "
               f"inputs (a batch change, e.g. guidance switching off, invalidates it)"),
        refresh=(f"over a {request.calls}-call request ({rules.semantics} rules, every {rules.cache_interval}): "
                 f"stores on calls {steps_text(by['store'])}; reuses on {len(by['reuse'])} calls, computes "
                 f"without storing on {len(by['compute'])}; {full_text(full)}"),
        shapes=(f"none: the memo holds the region's output {shape_text(node)}; on a reuse call its "
                f"{request.region_nodes} nodes do not run"))


SPEC = register(PassSpec(NAME, head_cache, order=50, tasks=("t2i",), hybrid=True, describe=describe,
                         writes=GUARD_REGION, bench_row=BenchRow("cache", NAME),
                         settings={"cache_interval": Setting(5, "int", low=1, doc="T_cache: the head cache is "
                                                                                 "refreshed every this many calls")}))
