"""Run the rewritten FX graph as Python: the reference every other lowering is tested against."""

from __future__ import annotations

from collections.abc import Callable

import torch


def lower_eager(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    return gm.forward
