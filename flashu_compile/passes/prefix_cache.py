"""prefix_cache: a denoising step computes only the image span; the text prefix's keys/values are cached.

A text-to-image row is ``[bos] prompt [boi] [time] [image]*N [eoi] [eos] [pad]...``. Under the
omni-attention mask a position before the span sees only earlier positions, so its hidden
states, in the LLM and in the flow head alike (adaLN modulation acts on image spans only), do
not depend on the latent or on t: its keys and values are the same at every step. The span sees
the prefix and itself, never what follows it, and v_pred is read from the span alone. So:

- the per-token computation downstream of the LLM's input (decoder layers, final norm, the flow
  head) runs on each row's span (time token + N image tokens, the same static length in every
  row, gathered at the row's own offset), with its rotary positions and mask rows;
- every attention (decoder layers and ``diffusion_head_a`` blocks) attends to
  ``[prefix K/V of the row, padded to a static window P = S - span with masked-out keys ; the
  span's own K/V]``; the tail (eoi, eos, padding) is never computed;
- the prefix K/V come from a prefix-only run of the same layers over positions ``[0, P)``, outlined
  behind :func:`prefix_guard`: computed on a request's first call, reused while the
  batch and phase stay the same and the prefix it was computed from (each row's embeddings before
  its span, span positions, mask) is the call's, dropped with the request.

The span is found structurally: the LLM's input is token embeddings with the time and image
tokens scattered in along the sequence (``scatter(1, index, values)``); its index is the span's
positions. The guard checks the layout the rewrite relies on (contiguous spans, a mask that hides
the span and tail from the prefix and the tail from the span) on the real inputs each time it
computes the prefix, and raises rather than return a wrong velocity.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from ..graph.outline import outline
from ..runtime.guards import controller, guard_op
from .manager import PassContext, PassNotApplicable, PassResult, tag
from .registry import (
    GUARD_REGION,
    BenchRow,
    DescribeContext,
    Described,
    PassSpec,
    full_calls,
    full_text,
    register,
)
from .token_subset import (
    classify,
    example_value,
    flat_args,
    propagate_shapes,
    resize,
    sequence_sized,
    static_dims,
    tagged,
    users_closure,
)

NAME = "prefix_cache"
PREFIX_KEY = "flashu_prefix_cache"  # node.meta of the prefix guard call: what graph-diff says about the window
_KEEP_META = ("nn_module_stack", "source_fn_stack", "stack_trace")


def _span_index(node: torch.fx.Node) -> torch.fx.Node | None:
    """``index`` when ``node`` is ``scatter(input, 1, index, values)`` of 3-D tensors, else None."""
    if not ((node.op == "call_method" and node.target == "scatter") or
            (node.op == "call_function" and node.target is torch.scatter)):
        return None
    if len(node.args) != 4 or node.kwargs:
        return None
    _, dim, index, _ = node.args
    value = example_value(node)
    if value is None or value.dim() != 3 or dim not in (1, -2) or not isinstance(index, torch.fx.Node):
        return None
    return index


def _is_sequence_gather(node: torch.fx.Node) -> bool:
    """``gather(x, 1, index)`` of a (B, S, C) value: where per-token values leave the sequence (v_pred's tokens)."""
    if not ((node.op == "call_method" and node.target == "gather") or
            (node.op == "call_function" and node.target is torch.gather)):
        return False
    source = node.args[0]
    value = example_value(source) if isinstance(source, torch.fx.Node) else None
    return value is not None and value.dim() == 3 and len(node.args) == 3 and node.args[1] in (1, -2)


def _is_attention(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is F.scaled_dot_product_attention


def _attention_mask(node: torch.fx.Node):
    return node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)


class _Rewrite:
    """What the rewrite reads and changes, all checked before the graph is touched."""

    def __init__(self, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        layers, blocks = ctx.index.layers, ctx.index.head_blocks
        if not layers or not blocks:
            raise PassNotApplicable("no decoder layers and flow-head blocks: not a denoising graph")
        self.stream = layers[0].input
        self.index = _span_index(self.stream)
        if self.index is None:
            raise PassNotApplicable(f"the LLM's input {self.stream.name} is not token embeddings with an image span "
                                    "scattered in along the sequence (scatter(1, index, values))")
        batch, self.seq, _ = example_value(self.stream).shape
        self.span = example_value(self.index).shape[1]
        if type(self.seq) is not int or type(self.span) is not int:
            raise PassNotApplicable("the sequence length or the image span was traced as a symbolic size")
        self.window = self.seq - self.span  # P: any row's prefix fits, since its span ends inside the sequence
        if self.window == 0:
            raise PassNotApplicable("the image span is the whole sequence: there is no prefix or tail")
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.order = order
        output = next(n for n in gm.graph.nodes if n.op == "output")
        # Everything computed per token from the LLM's input, plus what the blocks compute from shared
        # tables (rotary unsqueezes, adaLN chunks); v_pred's gather ends it.
        block_nodes = {n for block in (*layers, *blocks) for n in block.nodes}
        per_token = users_closure([self.stream], stop=_is_sequence_gather)
        region = per_token | block_nodes | users_closure(block_nodes, stop=_is_sequence_gather)
        self.exits = sorted((n for n in region if _is_sequence_gather(n)), key=order.get)
        self.region = sorted(region - set(self.exits), key=order.get)
        inside = set(self.region)
        if not self.exits:
            raise PassNotApplicable("no gather of per-token values along the sequence (the image tokens of v_pred)")
        for exit_ in self.exits:
            if exit_.args[0] not in inside or exit_.args[2] in inside:
                raise PassNotApplicable(f"{exit_.name} gathers along the sequence by an index computed per token")
        if any(arg in inside for arg in output.all_input_nodes):
            raise PassNotApplicable("the graph returns per-token values; computing only the span would change them")
        for node in per_token - set(self.exits):
            value = example_value(node)
            if value is not None and self.seq not in static_dims(value):
                raise PassNotApplicable(f"{node.name} {tuple(value.shape)} reduces the sequence axis; only attention "
                                        "and the gather of the image tokens may mix positions")
        self.attentions = [n for n in self.region if _is_attention(n)]
        if not self.attentions:
            raise PassNotApplicable("no scaled_dot_product_attention after the LLM's input")
        self.tables: dict[torch.fx.Node, str] = {}  # per-token input from outside -> "rows" or "square"
        model_dims = [batch]
        for node in self.region:
            for arg in node.all_input_nodes:
                if arg in inside or arg is self.stream:
                    continue
                kind = classify(arg, self.seq, "the layers after the LLM's input")
                if kind == "weight":
                    model_dims.extend(example_value(arg).shape)
                elif kind is not None:
                    self.tables[arg] = kind
        masks = [n for n, kind in self.tables.items() if kind == "square"]
        if len(masks) != 1:
            raise PassNotApplicable(f"{len(masks)} attention masks are read after the LLM's input; one is supported")
        (self.mask,) = masks
        for node in self.attentions:
            q, k, v = node.args[:3]
            if _attention_mask(node) is not self.mask or node.kwargs.get("is_causal"):
                raise PassNotApplicable(f"{node.name} does not attend with the sequence's attention mask")
            if k not in inside or v not in inside:
                raise PassNotApplicable(f"{node.name} reads keys/values computed outside the per-token layers")
            model_dims.extend(example_value(q).shape[i] for i in (1, 3))
        for user in self.mask.users:
            if user in inside and not _is_attention(user):
                raise PassNotApplicable(f"{user.name} reads the attention mask outside an attention")
        # Only static sizes can collide with the sequence length (a symbolic batch never equals it by value).
        self.sized = sequence_sized(self.region, self.seq, {d for d in model_dims if type(d) is int})
        sized = set(self.sized)
        for node in self.region:
            if node not in sized and self.seq in [a for a in flat_args(node) if type(a) is int]:
                raise PassNotApplicable(f"{node.name} holds the sequence length {self.seq} outside a view/reshape/"
                                        "expand size, which this pass cannot narrow")

    # ------------------------------------------------------------------ graph changes
    def hoist_tables(self, first: torch.fx.Node) -> None:
        """Move what the region reads from outside (and its inputs) before ``first``, so both runs can use it."""
        limit = self.order[first]
        pending = [arg for node in self.region for arg in node.all_input_nodes if arg not in set(self.region)]
        moved: set[torch.fx.Node] = set()
        while pending:
            node = pending.pop()
            if node in moved or self.order[node] < limit:
                continue
            moved.add(node)
            pending.extend(node.all_input_nodes)
        for node in sorted(moved, key=self.order.get):
            first.prepend(node)

    def span_inputs(self, graph: torch.fx.Graph, positions: torch.fx.Node, offsets: torch.fx.Node
                    ) -> dict[torch.fx.Node, torch.fx.Node]:
        """The stream, tables and mask at each row's span positions (mask columns: window, then span)."""
        call, fn = graph.call_method, graph.call_function
        s, span, p = self.seq, self.span, self.window
        b = call("size", (positions, 0))  # a node: dynamo may have traced the batch as a symbolic size

        def rows(value: torch.fx.Node) -> torch.fx.Node:
            width = example_value(value).shape[-1]
            index = call("expand", (call("unsqueeze", (positions, -1)), b, span, width))
            return fn(torch.gather, (call("expand", (value, b, s, width)), 1, index))

        out = {self.stream: rows(self.stream)}
        for value, kind in self.tables.items():
            if kind == "rows":
                out[value] = rows(value)
                continue
            mask = example_value(value)
            heads = mask.shape[1]
            full = call("expand", (value, b, heads, s, s))
            by_position = call("unsqueeze", (call("unsqueeze", (positions, 1)), -1))  # (B, 1, span, 1)
            by_row = fn(torch.gather, (full, 2, call("expand", (by_position, b, heads, span, s))))
            # A window column past the row's own prefix is another position (span or tail): hidden.
            hidden = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
            columns = fn(torch.arange, (p,), {"device": mask.device})
            visible = fn(operator.lt, (columns, call("view", (offsets, -1, 1, 1, 1))))
            window = fn(torch.where, (visible, call("narrow", (by_row, 3, 0, p)), hidden))
            by_column = call("unsqueeze", (call("unsqueeze", (positions, 1)), 1))  # (B, 1, 1, span)
            own = fn(torch.gather, (by_row, 3, call("expand", (by_column, b, heads, span, span))))
            out[value] = fn(torch.cat, ([window, own], -1))
        return out

    def window_inputs(self, graph: torch.fx.Graph) -> dict[torch.fx.Node, torch.fx.Node]:
        """The stream, tables and mask restricted to positions [0, P): a static slice, the same for every row."""
        p = self.window
        out = {self.stream: graph.call_method("narrow", (self.stream, 1, 0, p))}
        for value, kind in self.tables.items():
            narrowed = graph.call_method("narrow", (value, -2 if kind == "square" else 1, 0, p))
            out[value] = graph.call_method("narrow", (narrowed, -1, 0, p)) if kind == "square" else narrowed
        return out

    def copy_to_window(self, graph: torch.fx.Graph, env: dict[torch.fx.Node, torch.fx.Node]) -> list[torch.fx.Node]:
        """A prefix-only copy of the region over positions [0, P), inserted at the graph's insert point."""
        copies = []
        for node in self.region:
            copy = graph.node_copy(node, lambda a: env.get(a, a))
            # Fresh metadata: shapes are re-derived below, and a copy is a node of its own for provenance.
            copy.meta = {k: node.meta[k] for k in _KEEP_META if k in node.meta}
            tag(copy, NAME, replaces=node.name)
            env[node] = copy
            copies.append(copy)
        resize([env[n] for n in self.sized], self.seq, self.window, NAME)
        return copies



def _check_span_layout(positions: torch.Tensor, mask: torch.Tensor) -> None:
    """Raise unless each row's span is contiguous and the mask keeps prefix, span and tail apart as causal
    omni-attention does: the prefix sees neither span nor tail, the span does not see the tail."""
    span = positions.shape[1]
    start = positions[:, :1]
    if not torch.equal(positions, start + torch.arange(span, device=positions.device)):
        raise RuntimeError(f"prefix_cache needs each row's image span at consecutive positions, got starts "
                           f"{start.flatten().tolist()} with gaps")
    pos = torch.arange(mask.shape[-1], device=mask.device)
    prefix, tail = pos < start, pos >= start + span  # (B, S)
    in_span = ~prefix & ~tail
    # Hidden: a False boolean entry, or an additive one so negative that softmax gives it exactly 0.
    hidden = ~mask if mask.dtype == torch.bool else mask <= -1e9
    query, key = (slice(None), None, slice(None), None), (slice(None), None, None, slice(None))
    must_hide = (prefix[query] & ~prefix[key]) | (in_span[query] & tail[key])
    if bool((must_hide & ~hidden).any()):
        raise RuntimeError("prefix_cache needs a mask under which positions before the image span see neither the "
                           "span nor what follows it, and the span does not see what follows it (causal "
                           "omni-attention); this mask lets them")


def _prefix_inputs(positions: torch.Tensor, mask: torch.Tensor, stream: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What the prefix's keys/values are computed from: each row's embeddings before its span (later window
    positions, the span and tail, are masked out of the window and zeroed here), the span positions and the mask."""
    window = mask.shape[-1] - positions.shape[1]
    before = torch.arange(window, device=stream.device) < positions[:, :1]  # (B, P)
    rows = torch.where(before[..., None], stream[:, :window], torch.zeros((), dtype=stream.dtype,
                                                                          device=stream.device))
    return positions, mask, rows


@guard_op
def prefix_guard(cid: int, region, key: str, positions: torch.Tensor, mask: torch.Tensor, stream: torch.Tensor,
                 *inputs: Any) -> Any:
    """The text prefix's keys/values: computed on a request's first call, then reused while the batch is the same.

    The memo is per request and per input shapes (guidance switching off halves the batch: both
    batches keep their own), and is dropped when the phase changes, like the head cache. Outside
    a request nothing is kept. A reuse is exact or does not happen: the memo keeps what its
    keys/values were computed from (each row's prefix embeddings, span positions, mask) and is
    recomputed whenever the call's differ, so no request can be served another prompt's prefix.
    Before computing, the layout the rewrite relies on is checked.
    """
    st = controller(cid).state()
    if st is None:  # outside a request nothing is kept, so nothing needs comparing
        _check_span_layout(positions, mask)
        return region(*inputs)
    shapes = tuple(tuple(v.shape) for v in inputs if isinstance(v, torch.Tensor))
    source = _prefix_inputs(positions, mask, stream)
    kept = st.memo.get((key, shapes))
    if kept is not None and all(torch.equal(a, b) for a, b in zip(kept[0], source, strict=True)):
        st.history.append((st.step, "prefix reuse"))
        return kept[1]
    _check_span_layout(positions, mask)
    out = region(*inputs)
    st.memo[key, shapes] = (tuple(t.clone() for t in source), out)
    st.history.append((st.step, "prefix store"))
    return out


def prefix_cache(gm: torch.fx.GraphModule, ctx: PassContext, options) -> PassResult:
    rw = _Rewrite(gm, ctx)  # checks everything before the graph changes
    graph = gm.graph
    first = rw.region[0]
    rw.hoist_tables(first)
    with tagged(graph, NAME), graph.inserting_before(first):
        positions = graph.call_method("select", (rw.index, 2, 0))  # (B, span): each row's span positions
        offsets = graph.call_method("narrow", (positions, 1, 0, 1))  # (B, 1): where each row's span starts
        span_env = rw.span_inputs(graph, positions, offsets)
        before = set(graph.nodes)
        copies = rw.copy_to_window(graph, rw.window_inputs(graph))
        made = [n for n in graph.nodes if n not in before]
    # The span run: the region now reads the span's rows, and every attention the cached window first.
    inside = set(rw.region)
    for value, replacement in span_env.items():
        tag(replacement, NAME, replaces=value.name)
        for user in [u for u in value.users if u in inside]:
            user.replace_input_with(value, replacement)
    copy_of = dict(zip(rw.region, copies, strict=True))
    cached = []  # the window run's keys and values, in attention order
    for node in rw.attentions:
        with tagged(graph, NAME), graph.inserting_before(node):
            for position in (1, 2):
                own = node.args[position]
                cached.append(copy_of[own])
                node.update_arg(position, graph.call_function(torch.cat, ([copy_of[own], own], 2)))
    for exit_ in rw.exits:
        with tagged(graph, NAME), graph.inserting_before(exit_):
            exit_.update_arg(2, graph.call_function(operator.sub, (exit_.args[2],
                                                                   graph.call_method("unsqueeze", (offsets, -1)))))
        tag(exit_, NAME, replaces=exit_.name)
    resize(rw.sized, rw.seq, rw.span, NAME)
    ctx.index.replace_input(rw.stream, span_env[rw.stream])
    # Only what the cached keys/values need stays in the window run.
    window = []
    for node in reversed(made):
        if node.users:
            window.insert(0, node)
        else:
            graph.erase_node(node)
    propagate_shapes(gm, NAME)
    # Per row: the batch may be a symbolic size.
    kv_bytes = sum(math.prod(example_value(n).shape[1:]) * example_value(n).element_size() for n in cached)
    replaced = outline(gm, window, "flashu_prefix", prefix_guard,
                       (ctx.controller.id, "prefix", positions, rw.mask, rw.stream), NAME)
    guard = next(iter(replaced.values())).args[0]
    guard.meta[PREFIX_KEY] = {"sequence": [rw.seq, rw.span], "window": rw.window,
                              "attentions": len(rw.attentions), "kv_bytes_per_row": kv_bytes}
    return PassResult(True, {"sequence": f"{rw.seq} -> {rw.span}", "prefix_window": rw.window,
                             "cached_attentions": len(rw.attentions), "cached_kv_bytes_per_row": kv_bytes})


def describe(node: torch.fx.Node, request: DescribeContext) -> Described | None:
    if node.target is not prefix_guard:
        return None
    prefix = node.meta[PREFIX_KEY]
    seq, span = prefix["sequence"]
    cid = node.args[0]
    full = full_text(full_calls(controller(cid), request.calls))
    return Described(
        reads=(f"the {request.task} request's memo {node.args[2]!r} of controller {cid}, one entry per shape of the "
               "region's inputs (guidance switching off halves the batch: each batch keeps its own)"),
        refresh=(f"over a {request.calls}-call request: runs the prefix window on the first call of each batch size "
                 f"and reuses its keys/values on every later call; {full}"),
        shapes=(f"sequence {seq} -> {span} after the LLM's input: every layer and flow-head block runs on each "
                f"row's image span (time token + image tokens, gathered at the row's offset); its "
                f"{prefix['attentions']} attentions read [the cached window of {prefix['window']} positions, "
                f"masked past the row's prefix ; the span]; eoi, eos and padding are never computed; "
                f"the memo holds {prefix['kv_bytes_per_row'] / 2**10:.1f} KiB of keys/values per row"))


SPEC = register(PassSpec(
    NAME, prefix_cache, order=30, tasks=("t2i",), describe=describe,
    writes={**GUARD_REGION, PREFIX_KEY: '{"sequence": [full length, span length], "window": prefix positions '
                                        'cached, "attentions": how many read the cache, "kv_bytes_per_row": int} '
                                        "on the prefix guard call"},
    # A skipped layer changes the prefix's hidden states too, and importance is measured over every token:
    # neither fits a span-only step with a prefix computed once.
    conflicts={"layer_skip": "skipping a layer changes the cached prefix, and layer importance is measured over all "
                             "tokens"},
    bench_row=BenchRow("prefix", "prefix_cache (exact; not in the paper preset)")))
