"""Lower through TorchInductor, exactly as ``backend="inductor"`` would for the same graph."""

from __future__ import annotations

from collections.abc import Callable

import torch


def lower_inductor(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)
