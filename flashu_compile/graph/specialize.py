"""Specialize a graph's layer guards on a fixed skip set: a guard-free graph with the same results.

An answer fixes its skip set in the prefill and keeps it for every decoded token, yet each decode
step of the guarded graph still runs one Python guard and two compiled pieces per layer. Once the
skip set is known, every layer guard's decision is too: a kept layer becomes a plain call of its
outlined block, inlined, and a skipped one what its guard returns (the residual stream, the past
keys/values with placeholder entries, ``runtime.guards.skipped_cache``, as the same op), and
whatever only fed a skipped layer is dead code. The result is one flat graph of torch operations,
which Inductor's compile caches (AOTAutograd's among them) can hold: a call of a submodule or of
a function of this package would make AOTAutograd's cache pass it by.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.fx

from ..runtime.guards import layer_guard
from .rewrite import copy_graph, has_guards, inline_call


def layer_guards(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is layer_guard]


def resolve_layer_guards(gm: torch.fx.GraphModule, skip: Iterable[int]) -> torch.fx.GraphModule | None:
    """A copy of ``gm`` with every top-level layer guard decided for the skip set ``skip`` (layer indices), and each
    kept layer's block inlined.

    A layer whose block has an output no input can stand for (a prefill's KV write, marked -1 in
    its carry) runs whatever ``skip`` says, exactly as its guard would. Returns None when other
    guards remain (a head cache or a prefix cache decides per step, so no single graph serves).
    """
    skip = frozenset(skip)
    out = copy_graph(gm)
    for node in layer_guards(out):
        _cid, block, index, carry, *inputs = node.args
        if index in skip and -1 not in carry:
            if len(carry) == 1:
                node.replace_all_uses_with(inputs[0])
            else:  # one getitem per output: each becomes what the guard returns for it when skipped
                for item in list(node.users):  # outline() reads every output through a getitem
                    p = carry[item.args[1]]
                    if p == 0:
                        item.replace_all_uses_with(inputs[0])
                    else:
                        with out.graph.inserting_before(item):
                            length = out.graph.call_function(torch.ops.aten.sym_size.int, (inputs[0], -2))
                            kept = out.graph.call_function(torch.nn.functional.pad,
                                                           (inputs[p], (0, 0, 0, length)))
                        item.replace_all_uses_with(kept)
                    out.graph.erase_node(item)
        else:
            with out.graph.inserting_before(node):
                value = inline_call(out, getattr(out, block.target), tuple(inputs), block.target)
            if len(carry) == 1:
                node.replace_all_uses_with(value)
            else:
                for item in list(node.users):  # outline() reads every output through a getitem
                    item.replace_all_uses_with(value[item.args[1]])
                    out.graph.erase_node(item)
        out.graph.erase_node(node)
    # Blocks of skipped layers and what only fed them (their pruned weights' slices) are now unused.
    out.graph.eliminate_dead_code()
    out.delete_all_unused_submodules()
    out.graph.lint()
    out.recompile()
    return None if any(has_guards(m) for m in out.modules() if isinstance(m, torch.fx.GraphModule)) else out
