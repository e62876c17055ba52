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
from ..runtime.guards import memo_guard
from .manager import PassContext, PassNotApplicable, PassResult

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
