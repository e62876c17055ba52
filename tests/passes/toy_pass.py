"""A toy rewrite declared the way a real pass module is, from this one file.

It scales the last decoder layer's output by its own option ``toy_factor`` (default 1.0, so the
result is unchanged) and marks the scaling node with its own metadata key. Importing this file does not register it:
tests do (``register(SPEC)``) and undo it afterwards (``unregister(NAME)``), so other tests see
the real passes only.
"""

from __future__ import annotations

import torch
import torch.fx

from flashu_compile.options import Setting
from flashu_compile.passes.manager import PassContext, PassNotApplicable, PassResult, tag
from flashu_compile.passes.registry import BenchRow, DescribeContext, Described, PassSpec

NAME = "toy_scale"
TOY_KEY = "flashu_toy_scale"


def toy_scale(gm: torch.fx.GraphModule, ctx: PassContext, options) -> PassResult:
    if not ctx.index.layers:
        raise PassNotApplicable("no decoder layers in this graph")
    last = ctx.index.layers[-1].output
    with gm.graph.inserting_after(last):
        scaled = gm.graph.call_function(torch.mul, (last, options.toy_factor))
    last.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
    scaled.meta["example_value"] = last.meta.get("example_value")
    scaled.meta[TOY_KEY] = {"layer": ctx.index.layers[-1].path, "factor": options.toy_factor}
    tag(scaled, NAME, replaces=last.name)
    ctx.index.replace_input(last, scaled)
    return PassResult(True, {"scaled": ctx.index.layers[-1].path})


def describe(node: torch.fx.Node, request: DescribeContext) -> Described | None:
    info = node.meta.get(TOY_KEY)
    if info is None:
        return None
    return Described(reads="nothing at run time", refresh=f"never: the same factor on all {request.calls} calls",
                     shapes=f"none: {info['layer']}'s output times {info['factor']}", module=info["layer"])


SPEC = PassSpec(NAME, toy_scale, order=45, tasks=("t2i",), describe=describe,
                writes={TOY_KEY: '{"layer": module path, "factor": float} on the scaling node'},
                conflicts={"head_cache": "the toy scales a value the head cache memoizes"},
                bench_row=BenchRow("toy", "toy scaling"),
                settings={"toy_factor": Setting(1.0, "float", doc="what the last layer's output is multiplied by")})
