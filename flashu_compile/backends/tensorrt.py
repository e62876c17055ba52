"""Lower through Torch-TensorRT's dynamo backend (needs CUDA and the ``tensorrt`` extra).

Unverified here: no GPU is available to this project's machines, so this path is only checked
for its error messages. It hands the rewritten graph to the ``torch_tensorrt`` backend that
Torch-TensorRT registers with dynamo, which partitions it and falls back to PyTorch for
unsupported ops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def tensorrt_unavailable_reason() -> str | None:
    """Why the TensorRT lowering cannot run on this machine, or None if it can."""
    try:
        import torch_tensorrt  # noqa: F401
    except ImportError:
        return "torch-tensorrt is not installed (pip install 'flashu-compile[tensorrt]')"
    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA device and none is available"
    return None


def lower_tensorrt(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"lowering='tensorrt' cannot be used: {reason}")
    from torch._dynamo.backends.registry import lookup_backend

    trt_backend = lookup_backend("torch_tensorrt")
    return trt_backend(gm, example_inputs, options={"min_block_size": 1})
