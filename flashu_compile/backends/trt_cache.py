"""Where TensorRT engines are kept, and the key of a lowered program: its graph's structure and settings.

Engines themselves live in Torch-TensorRT's engine cache (``cache_built_engines`` /
``reuse_cached_engines`` under :func:`default_root`), which hashes each TensorRT subgraph by its
structure, input ranges and engine settings and refits a hit with the current weights. The key
here names a whole lowered program within a process: two graphs with the same key are lowered
once. A key never reads a tensor's values, only shapes and dtypes, because the lowering hands
every tensor (weights, and constants a pass wrote onto the graph) to its program as an input:
a program holds no values, so graphs that differ only in weights (identical layers) share it.
Nothing here needs TensorRT.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.fx

ENV_VAR = "FLASHU_TRT_CACHE"


def default_root() -> Path:
    """``$FLASHU_TRT_CACHE``, else ``~/.cache/flashu-compile/trt``."""
    return Path(os.environ.get(ENV_VAR) or Path.home() / ".cache" / "flashu-compile" / "trt")


def engine_entries(root: str | Path) -> set[str]:
    """The engines Torch-TensorRT's disk cache holds under ``root``: one folder per subgraph hash."""
    root = Path(root)
    return {p.name for p in root.iterdir() if p.is_dir()} if root.is_dir() else set()


def _qualified(fn: Any) -> str:
    if isinstance(fn, torch._ops.OpOverload):
        return str(fn)  # e.g. "aten.mm.default"
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def _describe(value: Any) -> Any:
    """A JSON-able description; never a default repr, whose memory addresses differ between processes."""
    if isinstance(value, torch.Tensor):
        return [[str(d) for d in value.shape], str(value.dtype)]  # symbolic sizes by their expression
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if callable(value):
        return _qualified(value)
    return repr(value)  # dtypes, devices, slices, symbolic scalars, input ranges


def _target(node: torch.fx.Node, gm: torch.fx.GraphModule) -> Any:
    if node.op in ("placeholder", "output"):
        return None  # placeholder names are dynamo's spelling of a source, not part of the computation
    if node.op == "call_method":
        return node.target
    if node.op in ("get_attr", "call_module"):
        attr = gm.get_submodule(node.target) if node.op == "call_module" else attribute(gm, node.target)
        if isinstance(attr, torch.fx.GraphModule):
            return ["graph", graph_hash(attr)]
        if isinstance(attr, torch.nn.Module):
            return [type(attr).__qualname__, [[k, _describe(v)] for k, v in sorted(attr.state_dict().items())]]
        return _describe(attr)
    return _qualified(node.target)


def attribute(gm: torch.nn.Module, qualname: str) -> Any:
    """The object a ``get_attr`` node's dotted ``qualname`` names on ``gm``."""
    obj: Any = gm
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def graph_hash(gm: torch.fx.GraphModule, inputs: list | None = None) -> str:
    """A hex digest of ``gm``'s structure and its inputs' descriptions that ignores node names and values.

    Nodes are numbered in graph order and arguments refer to those numbers. ``inputs`` describes the
    placeholders (tensors by shape and dtype; anything else by its repr, e.g. declared input ranges);
    without it, each placeholder's recorded example value is used.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if inputs is None:
        inputs = [n.meta.get("example_value", n.meta.get("val")) for n in placeholders]
    if len(inputs) != len(placeholders):
        raise ValueError(f"{len(inputs)} inputs for {len(placeholders)} placeholders")
    number = {node: i for i, node in enumerate(gm.graph.nodes)}
    values = dict(zip(placeholders, inputs, strict=True))

    def arg(a: Any) -> Any:
        return ["node", number[a]] if isinstance(a, torch.fx.Node) else _describe(a)

    nodes = []
    for node in gm.graph.nodes:
        args = torch.fx.node.map_aggregate(node.args, arg)
        kwargs = {k: torch.fx.node.map_aggregate(v, arg) for k, v in sorted(node.kwargs.items())}
        entry = [node.op, _target(node, gm), repr(args), repr(kwargs)]
        if node in values:
            entry.append(_describe(values[node]))
        nodes.append(entry)
    return hashlib.sha256(json.dumps(nodes, default=repr).encode()).hexdigest()


def cache_key(graph: str, settings: dict[str, Any]) -> str:
    """The key of a graph hash under lowering ``settings`` (JSON-serialisable values)."""
    payload = json.dumps({"graph": graph, "settings": settings}, sort_keys=True, default=repr)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]
