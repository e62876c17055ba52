"""Picks the lowering named by the options and returns the compiled callable."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .tensorrt import TensorRTSettings, lower_tensorrt

LOWERINGS = ("inductor", "eager", "tensorrt")


def lowering_for(options: Any) -> str | TensorRTSettings:
    """What ``lower`` takes for a FlashUOptions: the lowering's name, or the TensorRT lowering's settings."""
    return TensorRTSettings.from_options(options) if options.lowering == "tensorrt" else options.lowering


def lower(gm: torch.fx.GraphModule, example_inputs: list, lowering: str | TensorRTSettings) -> Callable:
    """Lower ``gm`` by name; a TensorRTSettings stands for "tensorrt" with those settings."""
    name = "tensorrt" if isinstance(lowering, TensorRTSettings) else lowering
    if name not in LOWERINGS:
        raise ValueError(f"unknown lowering {lowering!r}; choose one of {list(LOWERINGS)}")
    if name == "eager":
        from .eager import lower_eager

        return lower_eager(gm, example_inputs)
    from .segmented import SegmentedProgram, has_guards

    if has_guards(gm):
        # Guards read per-step state in Python; only the segments between them are compiled.
        return SegmentedProgram(gm, lowering, example_inputs)
    if name == "inductor":
        from .inductor import lower_inductor

        return lower_inductor(gm, example_inputs)
    return lower_tensorrt(gm, example_inputs, lowering if isinstance(lowering, TensorRTSettings) else None)
