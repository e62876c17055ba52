"""The ``flashu`` torch.compile backend: parse options, run the enabled passes, lower the graph.

Registered through the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="flashu", options={...})`` works after ``pip install`` without
importing this package first. Nothing registers at import time, so importing it twice (or
after dynamo loaded the entry point) cannot collide with the registry.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from .backends import lower
from .graph import build_index
from .options import FlashUOptions
from .passes.manager import Pass, PassManager

# Passes available in this build, by option name. A requested pass missing here is an error,
# never a silent no-op.
AVAILABLE_PASSES: dict[str, Pass] = {}


def build_pass_list(options: FlashUOptions) -> list[tuple[str, Pass]]:
    missing = [name for name in options.passes if name not in AVAILABLE_PASSES]
    if missing:
        raise ValueError(
            f"flashu pass(es) {missing} are not available in this build; available: {sorted(AVAILABLE_PASSES)} "
            "(use preset 'off' or list only available passes)"
        )
    return [(name, AVAILABLE_PASSES[name]) for name in options.passes]


def flashu_backend(gm: torch.fx.GraphModule, example_inputs: list, options: Any = None) -> Callable:
    """Dynamo backend entry: ``options`` is the dict given to ``torch.compile``."""
    opts = FlashUOptions.from_dict(options)
    manager = PassManager(build_pass_list(opts), strict=opts.strict, dump_dir=opts.debug_dir)
    if manager.passes:
        index = build_index(gm, example_inputs)
        if index.applicable:
            gm = manager.run(gm, index, opts)
        elif opts.strict:
            raise RuntimeError(f"flashu cannot rewrite this graph: {index.report()}")
        else:
            # A graph the index does not understand is lowered unchanged rather than guessed at.
            warnings.warn(f"flashu passes skipped for this graph, {index.report()}", stacklevel=2)
    return lower(gm, example_inputs, opts.lowering)
