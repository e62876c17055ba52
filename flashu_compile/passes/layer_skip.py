"""layer_skip: put a guard around every decoder layer so a step can skip it (identity on the stream).

Each layer is outlined into a submodule called through ``runtime.guards.layer_guard``. The
guard measures importance 1 - cos(h_in, h_out) on recalculation steps (generation: mean over
batch and tokens; an answer: the last token) and skips the int(L * r_LS) least important layers
on the others; the skip set lives in the request, so changing it never recompiles.

In prefill and decode graphs a layer also writes its keys and values: those outputs are
``cat(past, new)`` along the sequence (dim -2), and a skipped layer returns ``past`` with a zero
entry per new token. An answer fixes its skip set in the prefill (see ``runtime.guards``), so a
skipped layer's cache is never read again; the placeholders keep every layer's cache equally
long, so dynamo sees one cache length whatever the skip set, and a new skip set compiles nothing.
A prefill has no past to carry, so its layers always run (they are measured there).
"""

from __future__ import annotations

import torch
import torch.fx

from ..graph.outline import outline
from ..options import Setting
from ..runtime.guards import controller, layer_guard
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

NAME = "layer_skip"


def _past(node: torch.fx.Node, inside: set[torch.fx.Node]) -> torch.fx.Node | None:
    """For a KV-cache write ``cat([past, new], dim=-2)`` of (B, heads, T, D) tensors: ``past``, when it comes from
    outside the layer (what a skipped layer extends, see ``runtime.guards.skipped_cache``)."""
    if node.target is torch.cat and isinstance(node.args[0], (list, tuple)) and len(node.args[0]) == 2:
        past = node.args[0][0]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        value = node.meta.get("example_value")
        on_sequence = isinstance(value, torch.Tensor) and value.dim() == 4 and dim in (-2, 2)
        return past if on_sequence and isinstance(past, torch.fx.Node) and past not in inside else None
    return None


def layer_skip(gm, ctx: PassContext, options) -> PassResult:
    layers = ctx.index.layers
    if not layers:
        raise PassNotApplicable("no decoder layers in this graph")
    if not ctx.controller.num_skipped:
        # Guards would only measure importance nobody reads; the graph stays whole and compiles as one.
        raise PassNotApplicable(f"int({len(layers)} layers x skip_ratio {options.skip_ratio}) skips no layer")
    carries = []
    for layer in layers:
        inside = set(layer.nodes)
        carry = {layer.output: layer.input}
        for node in layer.nodes:
            if node is not layer.output and any(u not in inside for u in node.users):
                if ctx.task == "t2i":
                    raise PassNotApplicable(f"{layer.path} produces more than its residual output ({node.name})")
                carry[node] = _past(node, inside)
        carries.append(carry)
    replaced = {}  # a layer's output node -> the node now standing for it (the next layer's input)
    for layer, carry in zip(layers, carries, strict=True):
        stream = replaced.get(layer.input, layer.input)
        carry[layer.output] = stream
        replaced.update(outline(gm, layer.nodes, f"flashu_layer_{layer.index}", layer_guard,
                                (ctx.controller.id, layer.index), NAME, first_input=stream, carry=carry))
    return PassResult(True, {"guarded_layers": len(layers), "skipped_per_step": ctx.controller.num_skipped,
                             "recalculate_every": options.skip_interval if ctx.task == "t2i" else "prefill"})


def describe(node: torch.fx.Node, request: DescribeContext) -> Described | None:
    if node.target is not layer_guard:
        return None
    cid, index = node.args[0], node.args[2]
    ctl = controller(cid)
    full = full_calls(ctl, request.calls)
    skipping = f"skips the layer when it is among the {ctl.num_skipped} least important of {ctl.num_layers}"
    if request.task == "mmu":
        refresh = (f"measures 1 - cos(h_in, h_out) at the last token in the prefill (call 1); every decoded "
                   f"token then {skipping} (layer 0 always runs); a skipped layer appends no K/V")
    else:
        measure = [s for s in range(1, request.calls + 1) if ctl.rules.recalculate(s) and s not in full]
        refresh = (f"over a {request.calls}-call request: measures 1 - cos(h_in, h_out) on calls {steps_text(measure)} "
                   f"(every {ctl.rules.skip_interval}); in between, {skipping}; {full_text(full)}")
    return Described(
        reads=(f"the {request.task} request's step state of controller {cid}: step index, phase, the importance "
               f"measured for layer {index} and the skip set"),
        refresh=refresh,
        shapes=f"none: a skipped layer returns its input stream {shape_text(node)} unchanged")


SPEC = register(PassSpec(
    NAME, layer_skip, order=40, tasks=("t2i", "mmu"), hybrid=True, describe=describe, skips_layers=True,
    settings={"skip_ratio": Setting(0.2, "fraction", doc="r_LS: the fraction of the decoder layers skipped"),
              "skip_interval": Setting(10, "int", low=1, doc="T_LS: a generation measures layer importance every "
                                                             "this many calls"),
              "decode_graphs": Setting(8, "int", doc="guard-free decode graphs kept, one per answer skip set (0: "
                                                     "always the guarded graph)")},
    writes=GUARD_REGION,
    bench_row=BenchRow("skip", NAME)))
