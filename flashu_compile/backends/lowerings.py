"""The lowerings by name, and the one that lowers a graph without guards.

A graph with guards is cut into pieces first (``segmented.lower``); each guard-free piece comes back here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..options import LOWERINGS
from . import inductor
from .inductor import InductorSettings
from .tensorrt import TensorRTSettings, lower_tensorrt

# A lowering's name, or the settings standing for "tensorrt" or "inductor" with those settings.
Lowering = str | TensorRTSettings | InductorSettings


def lowering_for(options: Any) -> Lowering:
    """What ``lower`` takes for a FlashUOptions: the lowering's name, or the TensorRT lowering's settings, or the
    Inductor lowering's when it captures CUDA graphs."""
    if options.lowering == "tensorrt":
        return TensorRTSettings.from_options(options)
    if options.lowering == "inductor" and options.cudagraphs:
        return InductorSettings.from_options(options)
    return options.lowering


def lower_unguarded(gm: torch.fx.GraphModule, example_inputs: list, lowering: Lowering) -> Callable:
    """Lower ``gm``, which has no guard ops, by name; a TensorRTSettings stands for "tensorrt" with those settings,
    an InductorSettings for "inductor" with those."""
    name = {TensorRTSettings: "tensorrt", InductorSettings: "inductor"}.get(type(lowering), lowering)
    if name not in LOWERINGS:
        raise ValueError(f"unknown lowering {lowering!r}; choose one of {list(LOWERINGS)}")
    if name == "eager":
        from .eager import lower_eager

        return lower_eager(gm, example_inputs)
    if name == "inductor":
        # Through the module, so a test can watch every piece Inductor compiles.
        return inductor.lower_inductor(gm, example_inputs, lowering if isinstance(lowering, InductorSettings) else None)
    return lower_tensorrt(gm, example_inputs, lowering if isinstance(lowering, TensorRTSettings) else None)
