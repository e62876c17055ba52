"""Lower through Torch-TensorRT's ahead-of-time dynamo path (needs CUDA and the ``tensorrt`` extra).

The graph is exported, compiled with ``torch_tensorrt.dynamo.compile`` (which partitions it and
falls back to PyTorch for unsupported ops) and serialised into the engine cache
(:mod:`.trt_cache`), so a later process with the same graph, weights and settings loads the
engines instead of building them. ``flashu-compile build-trt`` fills the cache ahead of time.

Unverified here: no GPU is available to this project's machines, so only the cache and the
error messages are tested; the calls into Torch-TensorRT are not.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from .trt_cache import EngineCache, cache_key, engine_cache, graph_hash

# Compilation settings passed to torch_tensorrt.dynamo.compile; part of every cache key.
TRT_SETTINGS: dict[str, Any] = {"min_block_size": 1}


def tensorrt_unavailable_reason() -> str | None:
    """Why the TensorRT lowering cannot run on this machine, or None if it can."""
    try:
        import torch_tensorrt  # noqa: F401
    except ImportError:
        return "torch-tensorrt is not installed (pip install 'flashu-compile[tensorrt]')"
    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA device and none is available"
    return None


def engine_settings() -> dict[str, Any]:
    """Everything an engine depends on besides its graph: settings, library versions and the GPU."""
    import tensorrt
    import torch_tensorrt

    device = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"compile": TRT_SETTINGS, "torch": torch.__version__, "torch_tensorrt": torch_tensorrt.__version__,
            "tensorrt": tensorrt.__version__, "gpu": device.name, "capability": [device.major, device.minor]}


def _load(cache: EngineCache, key: str) -> Callable | None:
    import torch_tensorrt

    path = cache.get(key)
    if path is None:
        return None
    try:
        return torch_tensorrt.load(str(path)).module()
    except Exception as err:  # a file from another Torch-TensorRT build, say: rebuild rather than fail
        cache.discard(key, f"Torch-TensorRT cannot load it ({type(err).__name__}: {err})")
        return None


def lower_tensorrt(gm: torch.fx.GraphModule, example_inputs: list, cache: EngineCache | None = None) -> Callable:
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"lowering='tensorrt' cannot be used: {reason}")
    import torch_tensorrt

    cache = cache if cache is not None else engine_cache()
    settings = engine_settings()
    graph = graph_hash(gm, example_inputs)
    key = cache_key(graph, settings)
    program = _load(cache, key)
    if program is not None:
        return program
    exported = torch.export.export(gm, tuple(example_inputs), strict=False)
    program = torch_tensorrt.dynamo.compile(exported, arg_inputs=list(example_inputs), **TRT_SETTINGS)
    try:
        cache.put(key, lambda path: torch_tensorrt.save(program, str(path), arg_inputs=list(example_inputs)),
                  {"graph": graph, "settings": settings})
    except Exception as err:  # the compiled program is good; only later processes lose the cache
        warnings.warn(f"TensorRT engines not cached in {cache.root}: {type(err).__name__}: {err}", stacklevel=2)
    return program
