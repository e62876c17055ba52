"""token_drop: after a shallow decoder layer K, drop the visual tokens with the highest value norm (prefill).

FlashU's understanding-side pruning (V-Norm): the L2 norm of a visual token's value vector at
layer K is a proxy for how little it matters, so the fraction rho with the highest norm is
dropped (``token_drop_order`` flips the direction). Everything is computed in the graph with
static shapes: N image tokens always lose int(rho * N), whatever the image shows.

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

import contextlib
import operator
from collections.abc import Iterator

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from ..runtime.markers import MARK_VISUAL
from .manager import PROVENANCE_KEY, PassContext, PassNotApplicable, PassResult, tag

NAME = "token_drop"
# Ops whose integer arguments are sizes: dynamo writes the traced sequence length into them.
_SHAPE_METHODS = {"view", "reshape", "expand"}


def _value(node: torch.fx.Node) -> torch.Tensor | None:
    value = node.meta.get("example_value")
    return value if isinstance(value, torch.Tensor) else None


def token_drop(gm: torch.fx.GraphModule, ctx: PassContext, options) -> PassResult:
    markers = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is MARK_VISUAL]
    if not markers:
        return PassResult(False, {"reason": "no marked image tokens (an image-free prompt or a decode step)"})
    if len(markers) > 1:
        raise PassNotApplicable(f"{len(markers)} marked image spans; one per prefill is supported")
    (marker,) = markers
    embeds, positions = marker.args
    layers = ctx.index.layers
    k = options.token_drop_layer
    if k >= len(layers) - 1:
        raise ValueError(f"option 'token_drop_layer' is {k}, but this model has {len(layers)} decoder layers: "
                         f"tokens can be dropped after layers 0..{len(layers) - 2}")
    batch, n_visual = _value(positions).shape
    hidden = _value(layers[k].output)
    seq = hidden.shape[1]
    if batch != 1:
        raise PassNotApplicable(f"one prompt per prefill is supported, this graph has {batch}")
    n_drop = int(n_visual * options.token_drop_ratio)
    later = layers[k + 1:]
    plan = _Plan(gm, layers[k], later, seq, seq - n_drop)  # checks everything before the graph changes

    marker.replace_all_uses_with(embeds)
    ctx.index.replace_input(marker, embeds)
    gm.graph.erase_node(marker)
    if n_drop == 0:
        return PassResult(True, {"after_layer": k, "visual_tokens": n_visual, "dropped": 0})
    keep = _keep_positions(gm, plan, positions, n_drop, options.token_drop_order == "highest")
    # What graph-diff and other readers need to describe the op without re-deriving it.
    keep.meta["flashu_token_drop"] = {"after_layer": layers[k].path, "visual_tokens": n_visual, "dropped": n_drop,
                                      "order": options.token_drop_order, "sequence": [seq, seq - n_drop]}
    ctx.index.replace_input(layers[k].output, plan.apply(keep))  # for the passes that follow (layer_skip)
    _propagate_shapes(gm)
    return PassResult(True, {"after_layer": k, "visual_tokens": n_visual, "dropped": n_drop,
                             "layers_on_survivors": len(layers) - 1 - k, "sequence": f"{seq} -> {seq - n_drop}"})


class _Plan:
    """Which values downstream of layer K are per-token, and how each is narrowed to the survivors."""

    def __init__(self, gm: torch.fx.GraphModule, layer, later: list, seq: int, kept: int) -> None:
        self.gm, self.layer, self.seq, self.kept = gm, layer, seq, kept
        self.v, self.heads = self._value_heads(layer)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        output = next(n for n in gm.graph.nodes if n.op == "output")
        # The later layers (including what they compute from shared tables, e.g. rotary unsqueezes)
        # and everything computed from layer K's output: the final norm, the head.
        self.downstream: set[torch.fx.Node] = {n for block in later for n in block.nodes}
        frontier = [layer.output, *self.downstream]
        while frontier:
            for user in frontier.pop().users:
                if user not in self.downstream and user is not output:
                    self.downstream.add(user)
                    frontier.append(user)
        self.gathers: dict[torch.fx.Node, str] = {}  # external per-token input -> "rows" or "square"
        weights: set[int] = set()
        for node in sorted(self.downstream, key=order.get):
            for arg in node.all_input_nodes:
                if arg in self.downstream or arg is layer.output:
                    continue
                kind = self._classify(arg)
                if kind == "weight":
                    weights.update(_value(arg).shape)
                elif kind is not None:
                    self.gathers[arg] = kind
        for arg in output.all_input_nodes:
            value = _value(arg)
            if arg in self.downstream and value is not None and value.dim() == 3 and value.shape[1] == seq:
                raise PassNotApplicable(f"the graph returns per-token values after layer {layer.index} "
                                        f"({arg.name}); dropping tokens would change them")
        # Dynamo writes the sequence length into view/reshape/expand sizes. They are rewritten by
        # value, which is only unambiguous when no model dimension has the same size.
        if seq in weights | set(self.heads):
            raise PassNotApplicable(f"the sequence length {seq} equals a model dimension, so the traced sizes "
                                    "cannot be told apart; pad the prompt to another length")
        self.resized = []
        for node in self.downstream:
            sizes = [a for a in _flat_args(node) if type(a) is int]
            if _is_shape_op(node) and sizes.count(seq) > 1:
                raise PassNotApplicable(f"{node.name} has the sequence length {seq} twice among its sizes")
            if _is_shape_op(node) and seq in sizes:
                self.resized.append(node)

    def _value_heads(self, layer) -> tuple[torch.fx.Node, tuple[int, int]]:
        v = layer.attention["v_proj"].node
        for user in v.users:
            value = _value(user)
            if value is not None and value.dim() == 4 and tuple(value.shape[:2]) == tuple(_value(v).shape[:2]):
                return v, tuple(value.shape[2:])
        raise PassNotApplicable(f"{layer.path}.self_attn.v_proj output is never split into (kv heads, head dim)")

    def _classify(self, node: torch.fx.Node) -> str | None:
        value = _value(node)
        if value is None or self.seq not in value.shape:
            return None
        if value.dim() == 3 and value.shape[1] == self.seq:
            return "rows"  # (B, S, d): rotary tables, per-token embeddings
        if value.dim() == 4 and tuple(value.shape[2:]) == (self.seq, self.seq):
            return "square"  # (B, heads, S, S): an attention mask
        if node.op == "placeholder" and value.dim() <= 2:
            return "weight"  # a parameter one of whose sizes happens to equal S
        raise PassNotApplicable(f"{node.name} {tuple(value.shape)} is read after layer {self.layer.index} and its "
                                "sequence axis is not one this pass can narrow")

    def apply(self, keep: torch.fx.Node) -> torch.fx.Node:
        """Rewire the later layers to the survivors; returns the narrowed residual stream."""
        graph = self.gm.graph
        stream = self.layer.output
        with _tagged(graph), graph.inserting_before(keep.next):
            survivors = graph.call_method("select", (keep, 0, 0))  # (S',): one prompt per prefill
            index = graph.call_method("expand", (graph.call_method("unsqueeze", (keep, -1)), 1, self.kept,
                                                 _value(stream).shape[-1]))
            new_stream = graph.call_function(torch.gather, (stream, 1, index))
            self._replace(stream, new_stream)
        order = {n: i for i, n in enumerate(graph.nodes)}
        for value, kind in self.gathers.items():
            with _tagged(graph), graph.inserting_before(max(survivors, value, key=order.get).next):
                narrowed = graph.call_method("index_select", (value, -2 if kind == "square" else 1, survivors))
                if kind == "square":
                    narrowed = graph.call_method("index_select", (narrowed, -1, survivors))
            self._replace(value, narrowed)
        for node in self.resized:
            node.args = torch.fx.node.map_aggregate(node.args, lambda a: self.kept if type(a) is int and
                                                    a == self.seq else a)
            tag(node, NAME, replaces=node.name)
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
    with _tagged(graph), graph.inserting_before(plan.layer.output.next):
        v = call("view", (plan.v, 1, plan.seq, *plan.heads))
        # L2 over head_dim, then the mean over KV heads: one score per token.
        norms = call("mean", (fn(torch.linalg.vector_norm, (call("float", (v,)),), {"dim": -1}), -1))
        visual = fn(torch.gather, (norms, 1, positions))
        chosen = fn(operator.getitem, (fn(torch.topk, (visual, n_drop), {"dim": 1, "largest": highest}), 1))
        dropped = fn(torch.gather, (positions, 1, chosen))
        flags = call("scatter", (fn(torch.zeros, ((1, plan.seq),), {"dtype": torch.long}), 1, dropped, 1))
        # Survivors sort before dropped positions and keep their order among themselves.
        key = fn(operator.add, (fn(operator.mul, (flags, plan.seq)), fn(torch.arange, (plan.seq,))))
        order = fn(operator.getitem, (fn(torch.sort, (key,), {"dim": 1}), 1))
        return fn(operator.getitem, (order, (slice(None), slice(0, plan.kept))))


@contextlib.contextmanager
def _tagged(graph: torch.fx.Graph) -> Iterator[None]:
    """Tag every node created inside the block with this pass's provenance."""
    before = set(graph.nodes)
    yield
    for node in graph.nodes:
        if node not in before and PROVENANCE_KEY not in node.meta:
            tag(node, NAME)


def _flat_args(node: torch.fx.Node) -> list:
    flat: list = []
    torch.fx.node.map_aggregate((node.args, node.kwargs), flat.append)
    return flat


def _is_shape_op(node: torch.fx.Node) -> bool:
    return node.op == "call_method" and node.target in _SHAPE_METHODS


def _propagate_shapes(gm: torch.fx.GraphModule) -> None:
    """Re-derive every value's shape on fake tensors: a size the rewrite missed fails here, not at run time."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = [n.meta.get("example_value") for n in placeholders]
    # The mode the values were traced in (the compile context may hold another one).
    modes = {v.fake_mode for v in inputs if isinstance(v, FakeTensor)}
    if len(modes) != 1:
        return  # a graph not from dynamo (no fake values): the lowering's own tracing checks shapes
    (mode,) = modes
    gm.graph.lint()
    gm.recompile()
    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)
    except Exception as err:
        raise RuntimeError(f"token_drop left the graph with inconsistent shapes: {err}") from err
    for node in gm.graph.nodes:
        if "val" in node.meta and node.op != "placeholder":
            node.meta["example_value"] = node.meta["val"]
