"""On-disk cache of serialised TensorRT programs, keyed by what the engine depends on.

A key combines a hash of the graph (node ops, targets and argument structure, tensor shapes and
dtypes, and the values of the weights) with the lowering settings, so a changed weight, shape
or setting never reuses a stale engine, while renamed nodes or a new process do. Entries are
written atomically (temporary file, then ``os.replace``) with a metadata file holding the
payload's checksum, written last: an entry without it, or whose payload no longer matches it,
is discarded with a warning and rebuilt. Nothing here needs TensorRT.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.fx

from ..files import sha256_file, write_atomic

ENV_VAR = "FLASHU_TRT_CACHE"
SUFFIX = ".ep"  # Torch-TensorRT's serialised ExportedProgram


def default_root() -> Path:
    return Path(os.environ.get(ENV_VAR) or Path.home() / ".cache" / "flashu-compile" / "trt")


def _tensor_digest(t: torch.Tensor) -> str:
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def _is_weight(node: torch.fx.Node, value: Any) -> bool:
    """Weights (parameters and module buffers) are hashed by value; activations by shape and dtype only.

    Buffers are recognised by dynamo's record of a placeholder's source, present while dynamo
    calls the backend; a segment lowered later receives them as plain tensors, keyed by shape
    and dtype only (in Show-o2 these are rotary frequency tables, fixed by the configuration).
    """
    if isinstance(value, torch.nn.Parameter):
        return True
    # dynamo records where each placeholder came from; module attributes are weights or buffers.
    source = getattr(node.meta.get("grapharg"), "source", None)
    guard = getattr(source, "guard_source", None)
    return guard is not None and (guard.is_unspecialized_nn_module() or guard.is_specialized_nn_module())


def _qualified(fn: Any) -> str:
    if isinstance(fn, torch._ops.OpOverload):
        return str(fn)  # e.g. "aten.mm.default"
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def _describe(value: Any, weight: bool) -> Any:
    """A JSON-able description; never a default repr, whose memory addresses differ between processes."""
    if isinstance(value, torch.Tensor):
        desc = [list(value.shape), str(value.dtype)]
        return desc + [_tensor_digest(value)] if weight else desc
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if callable(value):
        return _qualified(value)
    return repr(value)  # dtypes, devices, slices, symbolic sizes


def _target(node: torch.fx.Node, gm: torch.fx.GraphModule) -> Any:
    if node.op in ("placeholder", "output"):
        return None  # placeholder names are dynamo's spelling of a source, not part of the computation
    if node.op == "call_method":
        return node.target
    if node.op in ("get_attr", "call_module"):
        attr = gm.get_submodule(node.target) if node.op == "call_module" else _attr(gm, node.target)
        if isinstance(attr, torch.fx.GraphModule):
            return ["graph", graph_hash(attr)]
        if isinstance(attr, torch.nn.Module):
            return [type(attr).__qualname__, [_describe(v, True) for _, v in sorted(attr.state_dict().items())]]
        return _describe(attr, True)  # constants written by passes (pruned weights) are weights
    return _qualified(node.target)


def _attr(gm: torch.fx.GraphModule, qualname: str) -> Any:
    obj: Any = gm
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def graph_hash(gm: torch.fx.GraphModule, example_inputs: list | None = None) -> str:
    """A hex digest of ``gm`` and its inputs that ignores node names.

    Nodes are numbered in graph order and arguments refer to those numbers. Inputs are described
    by shape and dtype, weights also by a digest of their values (``example_inputs`` gives the
    placeholders' values; without it, each placeholder's recorded example value is used).
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if example_inputs is None:
        example_inputs = [n.meta.get("example_value", n.meta.get("val")) for n in placeholders]
    if len(example_inputs) != len(placeholders):
        raise ValueError(f"{len(example_inputs)} example inputs for {len(placeholders)} placeholders")
    number = {node: i for i, node in enumerate(gm.graph.nodes)}
    values = dict(zip(placeholders, example_inputs, strict=True))

    def arg(a: Any) -> Any:
        # A tensor written into the graph as an argument is a constant: its value matters.
        return ["node", number[a]] if isinstance(a, torch.fx.Node) else _describe(a, True)

    nodes = []
    for node in gm.graph.nodes:
        args = torch.fx.node.map_aggregate(node.args, arg)
        kwargs = {k: torch.fx.node.map_aggregate(v, arg) for k, v in sorted(node.kwargs.items())}
        entry = [node.op, _target(node, gm), repr(args), repr(kwargs)]
        if node in values:
            entry.append(_describe(values[node], _is_weight(node, values[node])))
        nodes.append(entry)
    return hashlib.sha256(json.dumps(nodes, default=repr).encode()).hexdigest()


def cache_key(graph: str, settings: dict[str, Any]) -> str:
    """The entry name for a graph hash under lowering ``settings`` (JSON-serialisable values)."""
    payload = json.dumps({"graph": graph, "settings": settings}, sort_keys=True, default=repr)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


class EngineCache:
    """Serialised programs under ``root``: ``<key>.ep`` and its metadata ``<key>.json``."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.used: list[str] = []  # keys read or written by this process, in order

    def payload(self, key: str) -> Path:
        return self.root / f"{key}{SUFFIX}"

    def _meta(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get(self, key: str) -> Path | None:
        """The payload of a complete, intact entry, or None (a damaged entry is discarded with a warning)."""
        payload, meta = self.payload(key), self._meta(key)
        if not meta.exists():
            return None
        try:
            expected = json.loads(meta.read_text())["sha256"]
            intact = sha256_file(payload) == expected
        except (OSError, ValueError, KeyError, TypeError) as err:
            intact, expected = False, err
        if not intact:
            self.discard(key, f"its payload does not match its checksum ({expected})")
            return None
        self.used.append(key)
        return payload

    def put(self, key: str, write: Callable[[Path], None], meta: dict[str, Any]) -> Path:
        """Store an entry: ``write(path)`` serialises the program to ``path``; ``meta`` is kept beside it."""
        self.root.mkdir(parents=True, exist_ok=True)
        payload = self.payload(key)
        write_atomic(payload, write)
        record = meta | {"key": key, "file": payload.name, "sha256": sha256_file(payload)}
        # The metadata, written last, is what makes the entry visible to get().
        write_atomic(self._meta(key), lambda p: p.write_text(json.dumps(record, indent=2, default=repr) + "\n"))
        self.used.append(key)
        return payload

    def discard(self, key: str, why: str) -> None:
        warnings.warn(f"TensorRT cache entry {key} in {self.root} is discarded and will be rebuilt: {why}",
                      stacklevel=2)
        self._meta(key).unlink(missing_ok=True)
        self.payload(key).unlink(missing_ok=True)

    def entries(self) -> dict[str, dict[str, Any]]:
        """Metadata of every complete entry, by key."""
        if not self.root.is_dir():
            return {}
        return {p.stem: json.loads(p.read_text()) for p in sorted(self.root.glob("*.json"))}


def engine_cache() -> EngineCache:
    """The process's cache for the current root (``$FLASHU_TRT_CACHE`` or ``~/.cache/flashu-compile/trt``)."""
    return _cache_at(str(default_root()))


@functools.cache
def _cache_at(root: str) -> EngineCache:
    return EngineCache(root)
