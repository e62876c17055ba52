"""token_drop: after a shallow decoder layer K, drop the visual tokens with the highest value norm (prefill).

FlashU's understanding-side pruning (V-Norm): the L2 norm of a visual token's value vector at
layer K is a proxy for how little it matters, so the fraction rho with the highest norm is
dropped (``token_drop_order`` flips the direction). Everything is computed in the graph with
static shapes: N image tokens always lose int(rho * N), whatever the image shows.

The sequence length may be symbolic (dynamo makes it dynamic once a second prompt length is seen);
N is the image's token count, which is static, and so is the number dropped.

What the rewritten prefill does:
- layers 0..K run on every token and keep every token in the KV cache;
- after layer K the residual stream, the rotary tables and the attention mask are gathered to the
  surviving positions (in their original order), so survivors keep their RoPE positions and mask
  rows and columns; layers after K see only survivors and cache only theirs;
- text, time, boi and eoi tokens are never candidates: only the positions marked by
  ``runtime.markers.mark_visual`` are.
Decoding then needs no change: a new token's position comes from layer 0's cache length (every
token), and each layer attends to whatever its own cache holds.

A graph without marked image tokens (an image-free prompt, a decode step) is left alone.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from ..runtime.markers import MARK_VISUAL
from .manager import PassContext, PassNotApplicable, PassResult, tag
from .registry import DescribeContext, Described, PassSpec, register
from .token_subset import (
    classify,
    example_value,
    propagate_shapes,
    resize,
    sequence_sized,
    size_key,
    tagged,
    users_closure,
)

NAME = "token_drop"
DROP_KEY = "flashu_token_drop"  # node.meta of the op computing the kept positions: what graph-diff says about it

def token_drop(gm: torch.fx.GraphModule, ctx: PassContext, options) -> PassResult:
    markers = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is MARK_VISUAL]
    if not markers:
        raise PassNotApplicable("no marked image tokens (an image-free prompt, a decode step or a plain LLM)")
    if len(markers) > 1:
        raise PassNotApplicable(f"{len(markers)} marked image spans; one per prefill is supported")
    (marker,) = markers
    embeds, positions = marker.args
    layers = ctx.index.layers
    k = options.token_drop_layer
    if k >= len(layers) - 1:
        # The model's depth is the graph's, not a setting's fault: a preset's K may not fit a shallow model.
        raise PassNotApplicable(f"option 'token_drop_layer' is {k}, but this model has {len(layers)} decoder layers: "
                                f"tokens can be dropped after layers 0..{len(layers) - 2}")
    batch, n_visual = example_value(positions).shape
    hidden = example_value(layers[k].output)
    seq = hidden.shape[1]
    if batch != 1:
        raise PassNotApplicable(f"one prompt per prefill is supported, this graph has {batch}")
    n_drop = int(n_visual * options.token_drop_ratio)
    later = layers[k + 1:]
    plan = _Plan(gm, layers[k], later, seq, n_drop)  # checks everything before the graph changes

    marker.replace_all_uses_with(embeds)
    ctx.index.replace_input(marker, embeds)
    gm.graph.erase_node(marker)
    if n_drop == 0:
        return PassResult(True, {"after_layer": k, "visual_tokens": n_visual, "dropped": 0})
    keep = _keep_positions(gm, plan, positions, n_drop, options.token_drop_order == "highest")
    # What graph-diff and other readers need to describe the op without re-deriving it (a symbolic length as text).
    sequence = [seq, seq - n_drop] if type(seq) is int else [str(seq), str(seq - n_drop)]
    keep.meta[DROP_KEY] = {"after_layer": layers[k].path, "visual_tokens": n_visual, "dropped": n_drop,
                           "order": options.token_drop_order, "sequence": sequence}
    ctx.index.replace_input(layers[k].output, plan.apply(keep))  # for the passes that follow (layer_skip)
    propagate_shapes(gm, NAME)
    return PassResult(True, {"after_layer": k, "visual_tokens": n_visual, "dropped": n_drop,
                             "layers_on_survivors": len(layers) - 1 - k, "sequence": f"{seq} -> {seq - n_drop}"})


class _Plan:
    """Which values downstream of layer K are per-token, and how each is narrowed to the survivors."""

    def __init__(self, gm: torch.fx.GraphModule, layer, later: list, seq: int | torch.SymInt, n_drop: int) -> None:
        self.gm, self.layer, self.seq, self.n_drop = gm, layer, seq, n_drop
        self.v, self.heads = self._value_heads(layer)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        output = next(n for n in gm.graph.nodes if n.op == "output")
        # The later layers (including what they compute from shared tables, e.g. rotary unsqueezes)
        # and everything computed from layer K's output: the final norm, the head.
        self.downstream: set[torch.fx.Node] = {n for block in later for n in block.nodes}
        self.downstream |= users_closure([layer.output, *self.downstream])
        self.gathers: dict[torch.fx.Node, str] = {}  # external per-token input -> "rows" or "square"
        weights: set[int] = set()
        for node in sorted(self.downstream, key=order.get):
            for arg in node.all_input_nodes:
                if arg in self.downstream or arg is layer.output:
                    continue
                kind = classify(arg, seq, f"the layers after {layer.index}")
                if kind == "weight":
                    weights.update(example_value(arg).shape)
                elif kind is not None:
                    self.gathers[arg] = kind
        for arg in output.all_input_nodes:
            value = example_value(arg)
            if (arg in self.downstream and value is not None and value.dim() == 3
                    and size_key(value.shape[1]) == size_key(seq)):
                raise PassNotApplicable(f"the graph returns per-token values after layer {layer.index} "
                                        f"({arg.name}); dropping tokens would change them")
        # Dynamo writes the sequence length (a literal, or its symbol's node) into view/reshape/expand sizes.
        self.resized = sequence_sized(self.downstream, seq, weights | set(self.heads))

    def _value_heads(self, layer) -> tuple[torch.fx.Node, tuple[int, int]]:
        v = layer.attention["v_proj"].node
        for user in v.users:
            value = example_value(user)
            if value is not None and value.dim() == 4 and tuple(value.shape[:2]) == tuple(example_value(v).shape[:2]):
                return v, tuple(value.shape[2:])
        raise PassNotApplicable(f"{layer.path}.self_attn.v_proj output is never split into (kv heads, head dim)")

    def apply(self, keep: torch.fx.Node) -> torch.fx.Node:
        """Rewire the later layers to the survivors; returns the narrowed residual stream."""
        graph = self.gm.graph
        stream = self.layer.output
        with tagged(graph, NAME), graph.inserting_before(keep.next):
            survivors = graph.call_method("select", (keep, 0, 0))  # (S',): one prompt per prefill
            index = graph.call_method("expand", (graph.call_method("unsqueeze", (keep, -1)), 1, -1,
                                                 example_value(stream).shape[-1]))
            new_stream = graph.call_function(torch.gather, (stream, 1, index))
            # The later layers' sizes: a literal in a static graph, read off the survivors where S is symbolic.
            kept = (self.seq - self.n_drop if type(self.seq) is int
                    else graph.call_method("size", (new_stream, 1)))
            self._replace(stream, new_stream)
        order = {n: i for i, n in enumerate(graph.nodes)}
        for value, kind in self.gathers.items():
            with tagged(graph, NAME), graph.inserting_before(max(survivors, value, key=order.get).next):
                narrowed = graph.call_method("index_select", (value, -2 if kind == "square" else 1, survivors))
                if kind == "square":
                    narrowed = graph.call_method("index_select", (narrowed, -1, survivors))
            self._replace(value, narrowed)
        resize(self.resized, self.seq, kept, NAME)
        return new_stream

    def _replace(self, value: torch.fx.Node, narrowed: torch.fx.Node) -> None:
        """Later layers read ``narrowed`` where they read ``value``; layers up to K keep reading ``value``."""
        tag(narrowed, NAME, replaces=value.name)
        for user in [u for u in value.users if u in self.downstream]:
            user.replace_input_with(value, narrowed)


def _keep_positions(gm, plan: _Plan, positions: torch.fx.Node, n_drop: int, highest: bool) -> torch.fx.Node:
    """(1, S') long: the surviving positions in increasing order, computed from layer K's value vectors."""
    graph = gm.graph
    call, fn = graph.call_method, graph.call_function
    # No size here depends on S, so the same nodes serve a static and a symbolic sequence length.
    with tagged(graph, NAME), graph.inserting_before(plan.layer.output.next):
        v = call("view", (plan.v, 1, -1, *plan.heads))
        # L2 over head_dim, then the mean over KV heads: one score per token.
        norms = call("mean", (fn(torch.linalg.vector_norm, (call("float", (v,)),), {"dim": -1}), -1))
        visual = fn(torch.gather, (norms, 1, positions))
        chosen = fn(operator.getitem, (fn(torch.topk, (visual, n_drop), {"dim": 1, "largest": highest}), 1))
        dropped = fn(torch.gather, (positions, 1, chosen))
        flags = call("scatter", (fn(torch.zeros_like, (norms,), {"dtype": torch.long}), 1, dropped, 1))
        # A stable sort of the flags puts survivors before dropped positions, in their original order.
        order = fn(operator.getitem, (fn(torch.sort, (flags,), {"dim": 1, "stable": True}), 1))
        return fn(operator.getitem, (order, (slice(None), slice(None, -n_drop))))


def describe(node: torch.fx.Node, request: DescribeContext) -> Described | None:
    info = node.meta.get(DROP_KEY)
    if info is None:
        return None
    seq, kept = info["sequence"]
    return Described(
        module=info["after_layer"],
        reads=f"the value vectors of {info['after_layer']} (v_proj output: L2 over head_dim, mean over KV heads) "
              f"at the {info['visual_tokens']} positions the prompt marks as image tokens",
        refresh="every prefill: no state, the kept positions are computed from each prompt in the graph",
        shapes=f"sequence {seq} -> {kept} after {info['after_layer']}: drops the {info['dropped']} image tokens with "
               f"the {info['order']} norm; the residual stream, rotary tables and mask are gathered to the "
               f"survivors, later layers cache {kept} positions")


SPEC = register(PassSpec(
    NAME, token_drop, order=20, tasks=("mmu",), describe=describe,
    writes={DROP_KEY: '{"after_layer": module path of layer K, "visual_tokens": int, "dropped": int, "order": '
                      '"highest" | "lowest", "sequence": [length before, after]} on the op computing the kept '
                      "positions"}))
