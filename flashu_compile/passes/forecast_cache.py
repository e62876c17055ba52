"""forecast_cache: between refreshes of the flow-head trunk, forecast its output instead of reusing it.

The region is head_cache's (the last ``diffusion_head_a`` block's output and everything that feeds
only it: the head blocks, the decoder, the image embedding), outlined behind :func:`forecast_guard`.
It refreshes on the calls head_cache would store on (``cache_interval``, the request's step rules).
On the calls in between, where head_cache returns the last stored output unchanged, this pass
returns the polynomial through the last ``forecast_order + 1`` stored outputs, as functions of the
flow time t, evaluated at the call's t: first order extrapolates the latest change linearly, second
order also its curvature (the idea of TaylorSeer, which differences by step index; here the
differences are taken in t, so the shifted, uneven time grid is followed). With fewer stored outputs
than the order needs, the polynomial through those there are is used (one: plain reuse).

Invariants: a forecast reads only outputs of this request and this phase computed at the same input
shapes (a batch change, guidance switching off, starts the history anew, as it invalidates
head_cache's memo); the final ``hybrid_tau`` calls run the full network; outside a request the
region always runs. The eager reference is tests/passes/test_forecast_cache.py.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from ..graph.outline import outline
from ..options import Setting
from ..runtime.guards import controller, guard_op
from ..runtime.request import current_request
from .head_cache import exclusive_ancestors, trunk_actions
from .manager import PassContext, PassNotApplicable, PassResult
from .registry import (
    GUARD_REGION,
    BenchRow,
    DescribeContext,
    Described,
    PassSpec,
    full_text,
    register,
    shape_text,
    steps_text,
)

NAME = "forecast_cache"


def extrapolate(points: list[tuple[float, torch.Tensor]], t: float) -> torch.Tensor:
    """The polynomial of degree len(points) - 1 through ``points`` ((t_i, y_i), distinct t_i), evaluated at ``t``
    (Newton's divided differences, then Horner's rule)."""
    times = [p for p, _ in points]
    coef = [y for _, y in points]
    for j in range(1, len(points)):
        for i in range(len(points) - 1, j - 1, -1):
            coef[i] = (coef[i] - coef[i - 1]) / (times[i] - times[i - j])
    out = coef[-1]
    for i in range(len(points) - 2, -1, -1):
        out = coef[i] + (t - times[i]) * out
    return out


@guard_op
def forecast_guard(cid: int, region, key: str, order: int, *inputs: Any) -> Any:
    """The trunk: computed (and kept, on refresh calls) or forecast from the kept outputs at the call's t."""
    ctl = controller(cid)
    st = ctl.state()
    req = current_request()
    if st is None or st.full or req is None or req.time is None:
        return region(*inputs)
    shapes = tuple(tuple(v.shape) for v in inputs if isinstance(v, torch.Tensor))
    kept = st.memo.get(key)
    if kept is not None and kept[0] != shapes:
        kept = None  # a batch change: outputs of other rows cannot be extended to these
    action = ctl.rules.head_action(st.step, kept is not None)
    if action == "reuse":
        points = kept[1]
        st.history.append((st.step, "forecast" if len(points) > 1 else "reuse"))
        return extrapolate(points, req.time)
    out = region(*inputs)
    st.history.append((st.step, action))
    if action == "store":
        points = [p for p in (kept[1] if kept is not None else []) if p[0] != req.time]
        st.memo[key] = (shapes, (points + [(req.time, out)])[-(order + 1):])
    return out


def forecast_cache(gm, ctx: PassContext, options) -> PassResult:
    blocks = ctx.index.head_blocks
    if not blocks:
        raise PassNotApplicable("no flow-head blocks in this graph")
    region = exclusive_ancestors(gm, blocks[-1].output)
    consts = (ctx.controller.id, "forecast", options.forecast_order)
    outline(gm, region, "flashu_forecast_trunk", forecast_guard, consts, NAME)
    return PassResult(True, {"region_nodes": len(region), "refresh_every": options.cache_interval,
                             "order": options.forecast_order})


def describe(node: torch.fx.Node, request: DescribeContext) -> Described | None:
    if node.target is not forecast_guard:
        return None
    cid, order = node.args[0], node.args[3]
    rules = controller(cid).rules
    by = trunk_actions(cid, request.calls)
    stores, forecasts, full = by["store"], by["reuse"], by["full"]
    return Described(
        reads=(f"the {request.task} request's flow time t and the trunk outputs of its last {order + 1} refreshes "
               f"(controller {cid}); the shapes of the region's inputs (a batch change starts them anew)"),
        refresh=(f"over a {request.calls}-call request ({rules.semantics} rules, every {rules.cache_interval}): "
                 f"computes and keeps on calls {steps_text(stores)}; forecasts (order {order} in t) on "
                 f"{len(forecasts)} calls; {full_text(full)}"),
        shapes=(f"none: a forecast is the region's output {shape_text(node)} extrapolated; on a forecast call its "
                f"{request.region_nodes} nodes do not run"))


SPEC = register(PassSpec(
    NAME, forecast_cache, order=55, tasks=("t2i",), hybrid=True, describe=describe, writes=GUARD_REGION,
    conflicts={"head_cache": "both replace the flow-head trunk between refreshes; enable one of them"},
    bench_row=BenchRow("forecast", "forecast cache"),
    settings={"forecast_order": Setting(1, "int", low=0, doc="degree of the polynomial in t through the last "
                                                             "refreshes (0: reuse, as head_cache)")}))
