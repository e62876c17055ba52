"""token_drop: after a shallow decoder layer K, drop the visual tokens with the highest value norm (prefill).

FlashU's understanding-side pruning (V-Norm): the L2 norm of a visual token's value vector at
layer K is a proxy for how little it matters, so the fraction rho with the highest norm is
dropped (``token_drop_order`` flips the direction). Everything is computed in the graph: N image
tokens always lose int(rho * N), whatever the image shows, in every row of the batch.

Sizes may be symbolic: dynamo makes the sequence length dynamic once a second prompt length is
seen, and with ``dynamic=True`` (or images of several sizes) the batch and the image's token count
N too. A symbolic size is never compared by value, which would add a guard specializing the graph:
the sequence length is found by its symbol, and a symbolic N makes the number dropped an op of
the graph, int(rho * N) computed from N at run time.

What the rewritten prefill does:
- layers 0..K run on every token and keep every token in the KV cache;
- after layer K each row's residual stream, rotary tables and attention mask are gathered to that
  row's surviving positions (in their original order), so survivors keep their RoPE positions and
  mask rows and columns; layers after K see only survivors and cache only theirs;
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

from ..options import Setting
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
    seq = example_value(layers[k].output).shape[1]
    ratio = options.token_drop_ratio
    # None: N is symbolic and so is int(rho * N); int() on it here would guard the graph to this image's N.
    n_drop = 0 if ratio == 0 else int(n_visual * ratio) if type(n_visual) is int else None
    visual = n_visual if type(n_visual) is int else str(n_visual)  # what the stats say: symbolic sizes as text
    later = layers[k + 1:]
    plan = _Plan(gm, layers[k], later, seq, batch)  # checks everything before the graph changes

    marker.replace_all_uses_with(embeds)
    ctx.index.replace_input(marker, embeds)
    gm.graph.erase_node(marker)
    if n_drop == 0:
        return PassResult(True, {"after_layer": k, "visual_tokens": visual, "dropped": 0})
    keep = _keep_positions(gm, plan, positions, ratio if n_drop is None else n_drop,
                           options.token_drop_order == "highest")
    # What graph-diff and other readers need to describe the op without re-deriving it (symbolic sizes as text).
    dropped = n_drop if n_drop is not None else f"int({ratio:g} * {n_visual})"
    static = type(seq) is int and n_drop is not None
    sequence = [seq, seq - n_drop] if static else [str(seq), f"{seq} - {dropped}"]
    keep.meta[DROP_KEY] = {"after_layer": layers[k].path, "visual_tokens": visual, "dropped": dropped,
                           "order": options.token_drop_order, "sequence": sequence}
    new_stream = plan.apply(keep, sequence[1] if static else None)
    ctx.index.replace_input(layers[k].output, new_stream)  # for the passes that follow (layer_skip)
    propagate_shapes(gm, NAME)
    return PassResult(True, {"after_layer": k, "visual_tokens": visual, "dropped": dropped,
                             "layers_on_survivors": len(layers) - 1 - k, "sequence": f"{sequence[0]} -> {sequence[1]}"})


class _Plan:
    """Which values downstream of layer K are per-token, and how each is narrowed to the survivors."""

    def __init__(self, gm: torch.fx.GraphModule, layer, later: list, seq: int | torch.SymInt,
                 batch: int | torch.SymInt) -> None:
        self.gm, self.layer, self.seq, self.batch = gm, layer, seq, batch
        self.v, self.heads = self._value_heads(layer)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        output = next(n for n in gm.graph.nodes if n.op == "output")
        # The later layers (including what they compute from shared tables, e.g. rotary unsqueezes)
        # and everything computed from layer K's output: the final norm, the head.
        self.downstream: set[torch.fx.Node] = {n for block in later for n in block.nodes}
        self.downstream |= users_closure([layer.output, *self.downstream])
        self.gathers: dict[torch.fx.Node, str] = {}  # external per-token input -> "rows" or "square"
        # Literal sizes the traced sequence length could be mistaken for in view/reshape/expand sizes.
        model_dims: set[int] = {d for d in (*self.heads, batch) if type(d) is int}
        for node in sorted(self.downstream, key=order.get):
            for arg in node.all_input_nodes:
                if arg in self.downstream or arg is layer.output:
                    continue
                kind = classify(arg, seq, f"the layers after {layer.index}")
                if kind == "weight" and type(seq) is not int:
                    # Only a literal length can equal a weight's size by chance; an input holding the length's
                    # symbol is per-token, in a layout the gathers below do not know.
                    raise PassNotApplicable(f"{arg.name} {tuple(example_value(arg).shape)} is read by the layers "
                                            f"after {layer.index} and holds the sequence length {seq} on an axis "
                                            "this pass cannot narrow")
                if kind == "weight":
                    model_dims.update(d for d in example_value(arg).shape if type(d) is int)
                elif kind is not None:
                    self.gathers[arg] = kind
        for arg in output.all_input_nodes:
            value = example_value(arg)
            if (arg in self.downstream and value is not None and value.dim() == 3
                    and size_key(value.shape[1]) == size_key(seq)):
                raise PassNotApplicable(f"the graph returns per-token values after layer {layer.index} "
                                        f"({arg.name}); dropping tokens would change them")
        # Dynamo writes the sequence length (a literal, or its symbol's node) into view/reshape/expand sizes.
        self.resized = sequence_sized(self.downstream, seq, model_dims)

    def _value_heads(self, layer) -> tuple[torch.fx.Node, tuple[int, int]]:
        v = layer.attention["v_proj"].node
        # Sizes compared by key: a symbolic batch or length compared by value would guard the graph.
        rows = [size_key(d) for d in example_value(v).shape[:2]]
        for user in v.users:
            value = example_value(user)
            if value is not None and value.dim() == 4 and [size_key(d) for d in value.shape[:2]] == rows:
                return v, tuple(value.shape[2:])
        raise PassNotApplicable(f"{layer.path}.self_attn.v_proj output is never split into (kv heads, head dim)")

    def apply(self, keep: torch.fx.Node, kept: int | None) -> torch.fx.Node:
        """Rewire the later layers to each row's survivors (``keep``, (B, S')); ``kept`` is S' where it is a
        literal (a static graph), None where it is symbolic. Returns the narrowed residual stream."""
        graph = self.gm.graph
        stream = self.layer.output
        with tagged(graph, NAME), graph.inserting_before(keep.next):
            size = kept if kept is not None else graph.call_method("size", (keep, 1))
            new_stream = self._gather(stream, keep, size)
            self._replace(stream, new_stream)
        order = {n: i for i, n in enumerate(graph.nodes)}
        for value, kind in self.gathers.items():
            with tagged(graph, NAME), graph.inserting_before(max(new_stream, value, key=order.get).next):
                narrowed = self._gather(value, keep, size, square=kind == "square")
            self._replace(value, narrowed)
        resize(self.resized, self.seq, size, NAME)
        return new_stream

    def _gather(self, value: torch.fx.Node, keep: torch.fx.Node, kept: int | torch.fx.Node,
                square: bool = False) -> torch.fx.Node:
        """``value`` (B, S, d) narrowed to each row's survivors along S; ``square``: (B, h, S, S) along both S."""
        graph = self.gm.graph
        call = graph.call_method
        shape = example_value(value).shape

        def size(dim: int) -> int | torch.fx.Node:
            return shape[dim] if type(shape[dim]) is int else call("size", (value, dim))

        # gather with the index expanded by hand, not take_along_dim: that broadcasts with the sizes read as
        # ints, which specializes a symbolic length to the traced one.
        if square:
            row_index = call("expand", (call("unsqueeze", (call("unsqueeze", (keep, 1)), -1)), -1, size(1), -1,
                                        size(3)))
            column_index = call("expand", (call("unsqueeze", (call("unsqueeze", (keep, 1)), 1)), -1, size(1), kept,
                                           -1))
        else:
            row_index = call("expand", (call("unsqueeze", (keep, -1)), -1, -1, size(2)))
        if size_key(shape[0]) != size_key(self.batch):
            # A table every row shares (batch 1, e.g. the rotary tables) is narrowed to each row's survivors.
            batch = self.batch if type(self.batch) is int else call("size", (keep, 0))
            value = call("expand", (value, batch, *[-1] * (len(shape) - 1)))
        if not square:
            return graph.call_function(torch.gather, (value, 1, row_index))
        return graph.call_function(torch.gather, (graph.call_function(torch.gather, (value, 2, row_index)), 3,
                                                  column_index))

    def _replace(self, value: torch.fx.Node, narrowed: torch.fx.Node) -> None:
        """Later layers read ``narrowed`` where they read ``value``; layers up to K keep reading ``value``."""
        tag(narrowed, NAME, replaces=value.name)
        for user in [u for u in value.users if u in self.downstream]:
            user.replace_input_with(value, narrowed)


def _keep_positions(gm, plan: _Plan, positions: torch.fx.Node, drop: int | float, highest: bool) -> torch.fx.Node:
    """(B, S') long: each row's surviving positions in increasing order, computed from layer K's value vectors.

    ``drop`` is the number dropped (> 0) where the image's token count N is static, and the ratio where N is
    symbolic: then the graph computes int(ratio * N) from N at run time (possibly 0)."""
    graph = gm.graph
    call, fn = graph.call_method, graph.call_function
    # No size here depends on S or on the batch, so the same nodes serve static and symbolic ones.
    with tagged(graph, NAME), graph.inserting_before(plan.layer.output.next):
        v = call("unflatten", (plan.v, -1, plan.heads))
        # L2 over head_dim, then the mean over KV heads: one score per token.
        norms = call("mean", (fn(torch.linalg.vector_norm, (call("float", (v,)),), {"dim": -1}), -1))
        if isinstance(drop, int):
            n_drop, end = drop, -drop
        else:
            n_drop = fn(torch.sym_int, (fn(operator.mul, (call("size", (positions, 1)), drop)),))
            end = fn(operator.sub, (call("size", (norms, 1)), n_drop))
        visual = fn(torch.gather, (norms, 1, positions))
        chosen = fn(operator.getitem, (fn(torch.topk, (visual, n_drop), {"dim": 1, "largest": highest}), 1))
        dropped = fn(torch.gather, (positions, 1, chosen))
        flags = call("scatter", (fn(torch.zeros_like, (norms,), {"dtype": torch.long}), 1, dropped, 1))
        # A stable sort of the flags puts survivors before dropped positions, in their original order.
        order = fn(operator.getitem, (fn(torch.sort, (flags,), {"dim": 1, "stable": True}), 1))
        return fn(operator.getitem, (order, (slice(None), slice(None, end))))


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
    NAME, token_drop, order=20, tasks=("mmu",), describe=describe, decode_steps=False,
    settings={"token_drop_layer": Setting(2, "int", doc="K: the visual tokens are dropped after this decoder layer"),
              "token_drop_ratio": Setting(0.5, "fraction", doc="rho: the fraction of the visual tokens dropped"),
              "token_drop_order": Setting("highest", "choice", choices=("highest", "lowest"),
                                          doc="drop the tokens of the highest value norm (the paper's) or lowest")},
    writes={DROP_KEY: '{"after_layer": module path of layer K, "visual_tokens": int, "dropped": int, "order": '
                      '"highest" | "lowest", "sequence": [length before, after]} on the op computing the kept '
                      "positions"}))
