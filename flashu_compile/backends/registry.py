"""Picks the lowering named by the options and returns the compiled callable."""

from __future__ import annotations

from collections.abc import Callable

import torch


def lower(gm: torch.fx.GraphModule, example_inputs: list, lowering: str) -> Callable:
    if lowering == "eager":
        from .eager import lower_eager

        return lower_eager(gm, example_inputs)
    if lowering == "inductor":
        from .inductor import lower_inductor

        return lower_inductor(gm, example_inputs)
    if lowering == "tensorrt":
        from .tensorrt import lower_tensorrt

        return lower_tensorrt(gm, example_inputs)
    raise ValueError(f"unknown lowering {lowering!r}; choose one of ['inductor', 'eager', 'tensorrt']")
