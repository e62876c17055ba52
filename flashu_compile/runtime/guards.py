"""Guard ops: the explicit nodes through which a compiled graph reads the request's step state.

Passes outline a region of the graph (a decoder layer, the flow-head trunk, the text prefix's
window run) into a submodule and replace it by a call to one of these functions. They run in
Python between compiled segments, so what they decide (skip the layer, reuse the head or the
prefix's keys/values) changes per step without any recompilation. Each compilation owns a
:class:`Controller`; guard nodes name it by id, which keeps the graph printable and the decision
logic in one place.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..validate import warn_user
from .request import current_request
from .schedule import REFERENCE, StepRules

_IDS = itertools.count(1)
_CONTROLLERS: weakref.WeakValueDictionary[int, Controller] = weakref.WeakValueDictionary()

# Every guard op: a Python function a rewritten graph calls to decide, per call, whether and how to run a region
# (its first arguments name the controller and the region). Graph-diff, the segmented lowering and the guard-free
# specialization recognise guard calls by membership here, so a pass's own guard registers with :func:`guard_op`.
GUARDS: set[Callable[..., Any]] = set()


def guard_op(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Declare ``fn`` a guard op (see :data:`GUARDS`); returns it, so it serves as a decorator."""
    GUARDS.add(fn)
    return fn


@dataclass
class StepState:
    """What one compiled graph remembers across the steps of one request."""

    step: int = 0
    full: bool = False
    recalc_due: bool = False  # measure layer importance the next time the decoder runs
    skip: frozenset[int] = frozenset()
    importance: dict[int, float] = field(default_factory=dict)
    memo: dict[str, Any] = field(default_factory=dict)
    history: list[tuple[int, str]] = field(default_factory=list)  # (step, what ran): for tests and graph-diff


class Controller:
    """Step-dependent decisions of one compiled graph, from the options and the current request."""

    def __init__(self, task: str, rules: StepRules, num_layers: int = 0, skip_ratio: float = 0.0,
                 phased: bool = True) -> None:
        self.id = next(_IDS)
        self.task = task
        self.rules = rules
        self.num_layers = num_layers
        self.num_skipped = int(num_layers * skip_ratio)
        self.phased = phased  # whether this graph has a full phase at the end of a request
        # Graphs compiled with the same settings (e.g. one per batch size when guidance switches
        # off) serve the same request together: they share its skip set, importance and cache.
        self.family = (task, rules, num_layers, self.num_skipped, phased)
        self.warned_unknown_length = False
        _CONTROLLERS[self.id] = self

    def state(self) -> StepState | None:
        """The state for the current step, or None outside a request of this graph's task."""
        req = current_request()
        if req is None or req.task != self.task or req.step == 0:
            return None
        st = req.scratch.get(self.family)
        if st is None:
            st = req.scratch[self.family] = StepState()
        if st.step != req.step:
            self._begin_step(st, req.step, req.calls)
        return st

    def _begin_step(self, st: StepState, step: int, calls: int | None) -> None:
        if st.recalc_due and len(st.importance) == self.num_layers and self.num_layers:
            # The previous step measured every layer: the least important ones are skipped from now on.
            # In an answer, layer 0 always runs: its KV cache length is where the next token's position comes from.
            candidates = [i for i in st.importance if self.task == "t2i" or i != 0]
            order = sorted(candidates, key=lambda i: (st.importance[i], i))
            st.skip = frozenset(order[: self.num_skipped])
            st.recalc_due = False
        st.step = step
        if self.phased and calls is None and not self.warned_unknown_length:
            self.warned_unknown_length = True
            warn_user(f"flashu: the final full-network phase (hybrid_tau={self.rules.hybrid_tau}) counts back from "
                      f"the end of a request, and nothing in this loop's inputs says how many calls it makes; run "
                      f"it inside flashu_compile.request({self.task!r}, calls=N), or set hybrid_tau=0. Until then "
                      f"its requests run without that phase: faster and less exact than the options ask, so a "
                      f"timing of this loop overstates their speed-up")
        full = self.phased and calls is not None and self.rules.full_phase(step, calls)
        if full != st.full:
            st.memo.clear()  # the head cache belongs to one phase
            st.full = full
        # An answer measures once, in the prefill, and keeps that skip set for every token: a layer
        # skipped for a token writes only a placeholder KV entry, so it could not attend to that token later.
        if self.num_layers and (self.rules.recalculate(step) if self.task == "t2i" else step == 1):
            st.recalc_due = True
        if st.recalc_due:
            st.importance = {}

    def settled_skip(self) -> frozenset[int] | None:
        """The skip set when no later step of the request can change it (an answer after its prefill), else None."""
        if self.task != "mmu" or not self.num_layers:
            return None
        st = self.state()
        return None if st is None or st.recalc_due or st.full else st.skip

    @property
    def measuring_on_reuse(self) -> bool:
        # The public code runs the LLM on head-cache reuse steps; its importance is measured there.
        return self.rules.semantics == REFERENCE


def controller(cid: int) -> Controller:
    return _CONTROLLERS[cid]


def full_phase(cid: int) -> bool:
    st = controller(cid).state()
    return st is not None and st.full


@guard_op
def region(cid: int, block, *inputs: Any) -> Any:
    """A block compiled as a piece of its own and always run (regional compilation): structurally identical
    blocks (decoder layers that differ only in their weights, which are inputs) then compile once and hit the
    compile caches after. ``cid`` is unused; every guard op takes it first."""
    return block(*inputs)


@guard_op
def layer_guard(cid: int, block, index: int, carry: tuple[int, ...], *inputs: Any) -> Any:
    """A decoder layer: skipped when the step's skip set says so.

    The residual stream is input 0. ``carry`` gives, per output of the block, the input it stands on
    when the layer is skipped: the stream for the stream, the past K/V for a KV-cache write (which
    a skipped layer extends with placeholder entries, :func:`skipped_cache`). -1 means the output
    has no such input, so the layer runs.
    """
    ctl = controller(cid)
    st = ctl.state()
    if st is None or st.full:
        return block(*inputs)
    if st.recalc_due:
        out = block(*inputs)
        hidden, after = inputs[0], out if len(carry) == 1 else out[carry.index(0)]
        cos = torch.nn.functional.cosine_similarity(hidden.float(), after.float(), dim=-1)
        # Generation averages over every token (FlashU); an answer asks about the last one.
        st.importance[index] = float(1.0 - (cos[..., -1] if ctl.task == "mmu" else cos).mean())
        return out
    if index in st.skip and -1 not in carry:
        return inputs[0] if len(carry) == 1 else tuple(inputs[0] if p == 0 else skipped_cache(inputs[p], inputs[0])
                                                       for p in carry)
    return block(*inputs)


def skipped_cache(past: torch.Tensor, stream: torch.Tensor) -> torch.Tensor:
    """A skipped layer's KV-cache write: ``past`` (B, heads, T, D) with a zero entry for each of the ``stream``'s
    new tokens (B, S, H). The entries are never read: an answer keeps its skip set for every token, so the layer
    never runs again in it. They keep every layer's cache as long as layer 0's, as without skipping, so dynamo
    sees one cache length for all layers whatever the skip set (a cache left shorter is a static size of its own,
    and each new skip set would compile the decode step again). A graph specialized on the skip set
    (graph.specialize) writes the same op."""
    return torch.nn.functional.pad(past, (0, 0, 0, stream.shape[-2]))


@guard_op
def memo_guard(cid: int, region, key: str, *inputs: Any) -> Any:
    """A memoized region (the flow-head trunk): computed, stored or reused as the step rules say."""
    ctl = controller(cid)
    st = ctl.state()
    if st is None or st.full:
        return region(*inputs)
    shapes = tuple(tuple(v.shape) for v in inputs if isinstance(v, torch.Tensor))
    cached = st.memo.get(key)
    have = cached is not None and cached[0] == shapes  # a batch change (guidance off) invalidates it
    action = ctl.rules.head_action(st.step, have)
    st.history.append((st.step, action))
    if action == "reuse":
        if st.recalc_due and ctl.measuring_on_reuse:
            region(*inputs)  # run the decoder for its importance only; the output is the cached one
        return cached[1]
    out = region(*inputs)
    if action == "store":
        st.memo[key] = (shapes, out)
    return out
