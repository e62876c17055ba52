"""Picks the lowering named by the options and returns the compiled callable."""

from __future__ import annotations

from collections.abc import Callable

import torch

LOWERINGS = ("inductor", "eager", "tensorrt")


def lower(gm: torch.fx.GraphModule, example_inputs: list, lowering: str) -> Callable:
    if lowering not in LOWERINGS:
        raise ValueError(f"unknown lowering {lowering!r}; choose one of {list(LOWERINGS)}")
    if lowering == "eager":
        from .eager import lower_eager

        return lower_eager(gm, example_inputs)
    from .segmented import SegmentedProgram, has_guards

    if has_guards(gm):
        # Guards read per-step state in Python; only the segments between them are compiled.
        return SegmentedProgram(gm, lowering, example_inputs)
    if lowering == "inductor":
        from .inductor import lower_inductor

        return lower_inductor(gm, example_inputs)
    from .tensorrt import lower_tensorrt

    return lower_tensorrt(gm, example_inputs)
