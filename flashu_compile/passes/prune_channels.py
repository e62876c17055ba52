"""prune_channels: task-specific FFN pruning with physically smaller matmuls and no extra weights.

Each SwiGLU's neurons are permuted once, in place, as
``[generation-only | shared | understanding-only | neither]`` (the same permutation on gate/up
rows and down columns, so the function is unchanged). Each task's kept set is then one
contiguous range, and the graph reads ``narrow`` views of the original parameters: the pruned
FFNs of both tasks and the full FFN (the hybrid phase uses the unrewritten graph) share one
weight set. A model compiled with a plan therefore has its FFN neurons reordered; its eager
outputs are unchanged up to the summation order in ``down_proj``.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..graph.structure import FFN_NEURON_DIM
from .manager import PassContext, PassNotApplicable, PassResult, tag
from .registry import BenchRow, PassSpec, register

NAME = "prune_channels"
SHAPE_KEY = "flashu_shape"  # node.meta of a narrowed weight view: the shape the matmul now reads

# The order each FFN weight tensor has been permuted into, so a second graph of the same model
# (prefill after denoise) does not permute again. Keyed by tensor identity (tensors compare by value).
_LAYOUTS: WeakIdKeyDictionary = WeakIdKeyDictionary()
# Per plan, the FFN weight tensors (and their versions) it was last verified against.
_VERIFIED: WeakIdKeyDictionary = WeakIdKeyDictionary()
_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def ffn_layout(size: int, keep: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, tuple[int, int]]]:
    """Neuron order and each task's contiguous range; tasks beyond t2i/mmu are not supported."""
    gen = _mask(size, keep.get("t2i"))
    und = _mask(size, keep.get("mmu"))
    groups = [gen & ~und, gen & und, und & ~gen, ~gen & ~und]
    order = torch.cat([torch.nonzero(g).flatten() for g in groups])
    n = [int(g.sum()) for g in groups]
    ranges = {"full": (0, size)}
    if "t2i" in keep:
        ranges["t2i"] = (0, n[0] + n[1])
    if "mmu" in keep:
        ranges["mmu"] = (n[0], n[0] + n[1] + n[2])
    return order, ranges


def _mask(size: int, indices: torch.Tensor | None) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    if indices is not None:
        mask[indices] = True
    return mask


def _needs_layout(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, order: torch.Tensor) -> bool:
    """Whether one FFN still has to be put in ``order``; ValueError if another plan already reordered it."""
    key = tuple(order.tolist())
    done = [_LAYOUTS.get(w) for w in (gate, up, down)]
    if all(d == key for d in done):
        return False
    if any(d is not None for d in done):
        raise ValueError("these FFN weights were already reordered for a different plan; reload the model "
                         "before compiling it with another plan")
    return True


@torch.no_grad()
def apply_layout(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, order: torch.Tensor) -> None:
    """Permute one FFN's neurons in place (idempotent for the same order)."""
    if not _needs_layout(gate, up, down, order):
        return
    key = tuple(order.tolist())
    gate.copy_(gate[order])
    up.copy_(up[order])
    down.copy_(down[:, order])
    for w in (gate, up, down):
        _LAYOUTS[w] = key


def verify_plan(plan, index, weights: list[tuple[str, torch.Tensor]] = ()):
    """Check ``plan`` (None: nothing to check) against the graph ``index`` describes and the graph's parameters
    ``weights`` (``(name, tensor)``), before anything is permuted; returns ``plan``.

    Every parameter must be one of the weights of the model the plan was calibrated on (byte digests,
    the FFN neurons in any order), and every decoder layer's FFN the plan's. Raises the plan's
    ``PlanError`` naming the first mismatching weight or layer (or the layer counts), or a ValueError
    if another plan already reordered these weights; the graph and the weights are untouched.
    Graphs whose FFN weights are not graph inputs with known values are left to the pass, which
    does not apply to them. A plan already verified against the same weight tensors, unmodified
    since (``Tensor._version``), is not verified again: the backend verifies before the passes
    run, so that a wrong plan is an error rather than a skipped pass, and the pass then verifies
    once more at no cost.
    """
    if plan is None:
        return None
    layers = [(layer.path, [ref.weight_value for ref in (layer.mlp[p] for p in _PROJECTIONS)])
              for layer in index.layers]
    ffn_known = all(w is not None for _, ffn in layers for w in ffn)
    neuron_dim = {id(w): FFN_NEURON_DIM[p] for _, ffn in layers for p, w in zip(_PROJECTIONS, ffn, strict=True)
                  if w is not None}
    checked = [(name, w, neuron_dim.get(id(w))) for name, w in weights]
    state = [(w, w._version) for w in [*(w for _, ffn in layers if ffn_known for w in ffn),
                                       *(w for _, w, _ in checked)]]
    seen = _VERIFIED.get(plan)
    if seen is None or len(seen) != len(state) or not all(
            ref() is w and version == v for (ref, version), (w, v) in zip(seen, state, strict=True)):
        plan.validate()
        if ffn_known:  # first: its messages name the layer (count, path, size, which projection)
            plan.verify_ffns([(path, *ffn) for path, ffn in layers])
        plan.verify_weights(checked)
        _VERIFIED[plan] = [(weakref.ref(w), v) for w, v in state]
    if ffn_known:
        for i, ((_, ffn), layer) in enumerate(zip(layers, index.layers, strict=True)):
            _needs_layout(*ffn, _layout(plan, layer, i)[0])
    return plan


def _layout(plan, layer, i: int) -> tuple[torch.Tensor, dict[str, tuple[int, int]]]:
    return ffn_layout(layer.intermediate_size, {t: plan.keep[t][i] for t in plan.tasks})


def prune_channels(gm, ctx: PassContext, options) -> PassResult:
    plan = ctx.plan
    if plan is None:
        raise PassNotApplicable("no calibration plan was given (options={'plan': ...})")
    if ctx.task not in plan.tasks:
        raise PassNotApplicable(f"the plan has no {ctx.task!r} keep sets (it has {sorted(plan.tasks)})")
    layers = ctx.index.layers
    for layer in layers:
        if any(layer.mlp[p].weight_value is None for p in _PROJECTIONS):
            raise PassNotApplicable(f"{layer.path}.mlp weights are not graph inputs with known values")
    # Every layer is checked before the first is permuted: a mismatch at layer k must not leave
    # layers < k permuted in place.
    verify_plan(plan, ctx.index)
    before = after = 0
    for i, layer in enumerate(layers):
        order, ranges = _layout(plan, layer, i)
        gate, up, down = (layer.mlp[p] for p in _PROJECTIONS)
        weights = [ref.weight_value for ref in (gate, up, down)]
        apply_layout(*weights, order)
        start, stop = ranges[ctx.task]
        for ref, dim in ((gate, 0), (up, 0), (down, 1)):
            with gm.graph.inserting_before(ref.node):
                view = gm.graph.call_function(torch.narrow, (ref.weight, dim, start, stop - start))
            tag(view, NAME, replaces=ref.weight.name)
            view.meta[SHAPE_KEY] = tuple(stop - start if d == dim else s for d, s in enumerate(
                ref.weight_value.shape))
            ref.node.update_arg(1, view)
            tag(ref.node, NAME, replaces=ref.node.name)
            if dim == 0 and ref.bias is not None:
                with gm.graph.inserting_before(ref.node):
                    bias = gm.graph.call_function(torch.narrow, (ref.bias, 0, start, stop - start))
                tag(bias, NAME, replaces=ref.bias.name)
                ref.node.update_arg(2, bias)
        before += layer.intermediate_size
        after += stop - start
    return PassResult(True, {"layers": len(layers), "task": ctx.task, "ffn_neurons_before": before,
                             "ffn_neurons_after": after})


SPEC = register(PassSpec(
    NAME, prune_channels, order=10, tasks=("t2i", "mmu"), hybrid=True, needs_plan=True,
    prepare=lambda ctx, weights: verify_plan(ctx.plan, ctx.index, weights),
    writes={SHAPE_KEY: "on a narrow view of an FFN weight: the tuple shape the matmul reads"},
    bench_row=BenchRow("prune", NAME)))
