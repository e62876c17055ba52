"""layer_skip: put a guard around every decoder layer so a step can skip it (identity on the stream).

Each layer is outlined into a submodule called through ``runtime.guards.layer_guard``. The
guard measures importance 1 - cos(h_in, h_out) (mean over batch and tokens) on recalculation
steps and skips the int(L * r_LS) least important layers on the others; the skip set lives in
the request, so changing it never recompiles. A layer whose block leaks more than the residual
stream (a KV cache write, in prefill and decode graphs) cannot be skipped this way.
"""

from __future__ import annotations

from ..graph.outline import outline
from ..runtime.guards import layer_guard
from .manager import PassContext, PassNotApplicable, PassResult

NAME = "layer_skip"


def layer_skip(gm, ctx: PassContext, options) -> PassResult:
    layers = ctx.index.layers
    if not layers:
        raise PassNotApplicable("no decoder layers in this graph")
    if ctx.task != "t2i":
        raise PassNotApplicable("layer skipping is implemented for denoising graphs; this graph writes a KV cache")
    for layer in layers:
        escaping = [n for n in layer.nodes if n is not layer.output and any(u not in layer.nodes for u in n.users)]
        if escaping:
            raise PassNotApplicable(f"{layer.path} produces more than its residual output "
                                    f"({', '.join(n.name for n in escaping[:3])})")
    replaced = {}  # a layer's output node -> the guard call now standing for it (the next layer's input)
    for layer in layers:
        stream = replaced.get(layer.input, layer.input)
        replaced[layer.output] = outline(gm, layer.nodes, f"flashu_layer_{layer.index}", layer_guard,
                                         (ctx.controller.id, layer.index, 0), NAME, first_input=stream)
    return PassResult(True, {"guarded_layers": len(layers), "skipped_per_step": ctx.controller.num_skipped,
                             "recalculate_every": options.skip_interval})
