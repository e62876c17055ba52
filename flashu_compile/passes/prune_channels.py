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


def verify_plan(plan, index):
    """Check ``plan`` (None: nothing to check) against every decoder layer of the graph ``index``
    describes, before anything is permuted; returns ``plan``.

    Raises the plan's ``PlanError`` naming the first mismatching layer (or the layer counts), or a
    ValueError if another plan already reordered these weights; the graph and the weights are
    untouched. Graphs whose FFN weights are not graph inputs with known values are left to the
    pass, which does not apply to them. A plan already verified against the
    same weight tensors, unmodified since (``Tensor._version``), is not verified again: the backend
    verifies before the passes run, so that a wrong plan is an error rather than a skipped pass,
    and the pass then verifies once more at no cost.
    """
    if plan is None:
        return None
    layers = [(layer.path, [ref.weight_value for ref in (layer.mlp[p] for p in _PROJECTIONS)])
              for layer in index.layers]
    if any(w is None for _, weights in layers for w in weights):
        return plan
    state = [(w, w._version) for _, weights in layers for w in weights]
    seen = _VERIFIED.get(plan)
    if seen is None or len(seen) != len(state) or not all(
            ref() is w and version == v for (ref, version), (w, v) in zip(seen, state, strict=True)):
        plan.validate()
        plan.verify_ffns([(path, *weights) for path, weights in layers])
        _VERIFIED[plan] = [(weakref.ref(w), v) for w, v in state]
    for i, ((_, weights), layer) in enumerate(zip(layers, index.layers, strict=True)):
        _needs_layout(*weights, _layout(plan, layer, i)[0])
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
    NAME, prune_channels, order=10, tasks=("t2i", "mmu"), hybrid=True,
    writes={SHAPE_KEY: "on a narrow view of an FFN weight: the tuple shape the matmul reads"},
    bench_row=BenchRow("prune", NAME)))
