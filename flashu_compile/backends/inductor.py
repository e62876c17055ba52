"""Lower through TorchInductor, exactly as ``backend="inductor"`` would for the same graph.

With the option ``cudagraphs``, each graph compiled here (a whole graph, or each piece between
the guards) is compiled as ``mode="reduce-overhead"`` would, and replays as CUDA graphs on a GPU.

Dynamo compiles a frame inside its tracing context, whose fake mode carries a shape environment;
Inductor's FX graph cache and AOTAutograd's cache key a graph only with one ("No shape env" is a
bypass). The pieces flashu compiles lazily, on one call's real inputs after dynamo's context has
closed (segments between guards, outlined regions, the full-network graph of a static trace), get
a context of their own with static sizes, so they hit those caches as a plain dynamo graph does:
in a restarted process, and across structurally identical pieces (decoder layers that differ only
in their weights, which are inputs) within one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..graph.compat import FakeTensorMode, ShapeEnv, TracingContext, detect_fake_mode, tracing
from ..validate import warn_user


@dataclass(frozen=True)
class InductorSettings:
    """Inductor settings beyond the defaults ``backend="inductor"`` uses."""

    cudagraphs: bool = False  # replay each compiled piece as CUDA graphs

    @classmethod
    def from_options(cls, options: Any) -> InductorSettings:
        return cls(cudagraphs=options.cudagraphs)

    def config_patches(self) -> dict[str, Any]:
        return {"triton.cudagraphs": True} if self.cudagraphs else {}


def on_cuda(example_inputs: list) -> bool:
    """Whether any tensor input lives on a CUDA device (fake inputs report the device they stand for)."""
    return any(isinstance(x, torch.Tensor) and x.device.type == "cuda" for x in pytree.tree_leaves(example_inputs))


def lower_inductor(gm: torch.fx.GraphModule, example_inputs: list, settings: InductorSettings | None = None
                   ) -> Callable:
    """``gm`` compiled by Inductor; with ``settings.cudagraphs`` on a CUDA graph, as ``mode="reduce-overhead"``
    compiles it (Inductor records and replays it as CUDA graphs), each output returned as a copy.

    Why copies: a recorded graph writes its outputs into the same memory on every replay, and the
    backend's guards keep some outputs across steps (the flow-head cache, the text prefix's keys
    and values). A copy is the caller's own; nothing of the graph's memory stays referenced, so the
    next call replays instead of recording anew. A graph without CUDA inputs compiles as without
    the option, with a warning: CUDA graphs exist only on a GPU.
    """
    from torch._inductor.compile_fx import compile_fx

    if settings is not None and settings.cudagraphs and not on_cuda(example_inputs):
        warn_user("flashu: option cudagraphs=True is ignored for a graph whose inputs are not on a CUDA device "
                  "(CUDA graphs need a GPU); Inductor compiles it without them")
        settings = None
    patches = settings.config_patches() if settings is not None else {}
    if detect_fake_mode(pytree.tree_leaves(example_inputs)) is not None:
        compiled = compile_fx(gm, example_inputs, config_patches=patches)  # dynamo's own context, or its fakes
    else:
        fake_mode = FakeTensorMode(shape_env=ShapeEnv())
        # Every tensor, tuples' included, at its static size: no symbol may enter a piece compiled for one shape.
        fakes = pytree.tree_map_only(torch.Tensor, lambda x: fake_mode.from_tensor(x, static_shapes=True),
                                     example_inputs)
        with tracing(TracingContext(fake_mode)):
            compiled = compile_fx(gm, fakes, config_patches=patches)
    return copied_outputs(compiled) if patches else compiled


def copied_outputs(fn: Callable) -> Callable:
    """``fn`` with every tensor of its output replaced by a copy, in ``fn``'s calling convention (Inductor may
    return a "boxed" function, which takes its inputs as one list)."""
    def copy(out: Any) -> Any:
        return pytree.tree_map_only(torch.Tensor, torch.clone, out)

    if getattr(fn, "_boxed_call", False):
        def boxed(args: list) -> Any:
            return copy(fn(args))

        boxed._boxed_call = True  # type: ignore[attr-defined]
        return boxed

    def run(*args: Any) -> Any:
        return copy(fn(*args))

    return run
