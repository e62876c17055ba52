"""The calibration Plan: which FFN neurons each task keeps, and which model it was calibrated for.

A plan is saved as a directory ``<path>/`` holding ``plan.safetensors`` (the kept indices and the
scores, one tensor per task and layer) and ``plan.json`` (everything else, with a format version
and the SHA-256 of the tensor file, so the two files cannot be silently mixed up).

The model fingerprint must survive the FFN permutation the compiler applies later (neurons are
reordered in place as [generation-only | shared | understanding-only | neither], the same
permutation on gate/up rows and down columns, which leaves the function unchanged), and must
change with any weight's values or layout (a transposed square weight is another model). So it
is built from a SHA-256 digest of every weight's bytes in a fixed order (:func:`weight_digest`):
a weight's elements in storage order, except that the FFN's neurons (gate/up rows, down columns)
are hashed sorted by a key computed from their own bytes, an order no permutation changes.
Digests are cached per tensor until it is modified, so a model is hashed once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ..files import replacing_dir, sha256_file
from ..graph.structure import FFN_NEURON_DIM, PATTERNS

FORMAT = "flashu-plan"
FORMAT_VERSION = 3  # 2: plan.json carries the digest of its own contents; 3: byte digests of every weight
TENSORS_FILE = "plan.safetensors"
META_FILE = "plan.json"
FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class PlanError(ValueError):
    """A plan that cannot be saved, loaded or applied; the message names the problem."""


# --------------------------------------------------------------------------- model structure
def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(module path, layer)`` for each decoder layer, e.g. ``("showo.model.layers.0", layer)``.

    The decoder stack is the one ``ModuleList`` named like ``...layers`` whose every block has a
    SwiGLU ``mlp`` (gate/up/down projections): Show-o2's ``showo.model.layers``, a transformers
    Qwen2 or Llama model's ``model.layers``; SigLIP's ``layers`` (fc1/fc2) are not one. The paths
    are the model's own ``named_modules`` names, which are also what a dynamo graph's
    ``nn_module_stack`` gives once its root (``L['self']``, or ``L['args'][0]`` through a wrapper) is stripped.
    """
    stacks = [(name, module) for name, module in model.named_modules()
              if isinstance(module, nn.ModuleList) and len(module) and PATTERNS["decoder_layer"].match(f"{name}.0")
              and all(_is_swiglu_block(layer) for layer in module)]
    if len(stacks) != 1:
        found = "none" if not stacks else ", ".join(name for name, _ in stacks)
        raise ValueError("expected one decoder stack (a ModuleList named '...layers' of blocks whose mlp has "
                         f"{', '.join(FFN_PROJECTIONS)}), found {found}")
    prefix, layers = stacks[0]
    return [(f"{prefix}.{i}", layer) for i, layer in enumerate(layers)]


def _is_swiglu_block(layer: nn.Module) -> bool:
    mlp = getattr(layer, "mlp", None)
    return mlp is not None and all(isinstance(getattr(mlp, p, None), nn.Linear) for p in FFN_PROJECTIONS)


def keep_count(intermediate_size: int, prune_ratio: float, multiple: int) -> int:
    """How many FFN neurons a task keeps: ``I - floor(I * r)`` rounded down to a multiple of
    ``multiple``, but at least ``multiple`` and at most ``I`` (all of them when ``I < multiple``)."""
    if intermediate_size < multiple:
        return intermediate_size
    # round() first: I * r can land just below an integer (e.g. 2.9999999999999996) and floor
    # would then prune one neuron too few.
    pruned = math.floor(round(intermediate_size * prune_ratio, 9))
    kept = (intermediate_size - pruned) // multiple * multiple
    return min(max(kept, multiple), intermediate_size)


# --------------------------------------------------------------------------- weight digests
_MODULUS = (1 << 31) - 1  # a prime: row keys are sums of byte values times coefficients, modulo it
_KEY_ELEMENTS = 1 << 22  # elements per chunk of the row-key computation: bounds its int64 temporaries
_BYTE_CHUNK = 1 << 26  # bytes handed to the hash at once
_DIGESTS = WeakIdKeyDictionary()  # tensor -> ((its _version, unordered dim), digest): each weight hashed once
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _coefficients(width: int, device: torch.device) -> torch.Tensor:
    """Two fixed rows of pseudo-random multipliers in [1, modulus): the same on every machine and run."""
    gen = torch.Generator().manual_seed(0x5EED)
    return torch.randint(1, _MODULUS, (2, width), generator=gen, dtype=torch.int64).to(device)


def _canonical_order(rows: torch.Tensor) -> torch.Tensor:
    """An order of ``rows`` (2-D) that depends on each row's bytes only, so any permutation of the rows gives
    the same sequence: sorted by two independent modular hashes of the row (62 bits; rows that collide are
    equal or, with negligible probability, make a permuted model look like another one, never the reverse)."""
    values = rows.contiguous().view(_INT_VIEW[rows.element_size()])
    coeffs = _coefficients(values.shape[1], values.device)
    keys = []
    step = max(1, _KEY_ELEMENTS // max(1, values.shape[1]))
    for start in range(0, values.shape[0], step):
        x = values[start:start + step].to(torch.int64).remainder(_MODULUS)
        # Each product is below 2**62 and each sum below 2**62 for rows up to 2**31 wide: no overflow.
        k = [(x * c).remainder(_MODULUS).sum(dim=1).remainder(_MODULUS) for c in coeffs]
        keys.append(k[0] * _MODULUS + k[1])
    return torch.argsort(torch.cat(keys), stable=True)


def weight_digest(weight: torch.Tensor, unordered_dim: int | None = None) -> str:
    """SHA-256 (hex) of ``weight``'s dtype, shape and bytes; with ``unordered_dim``, its slices along that dim
    (an FFN's neurons) are hashed in :func:`_canonical_order`, so permuting them leaves the digest unchanged.

    Any change of a value, the dtype or the layout (a transpose, even of a square weight) changes it.
    Cached per tensor until the tensor is modified in place (``Tensor._version``).
    """
    key = (weight._version, unordered_dim)
    hit = _DIGESTS.get(weight)
    if hit is not None and hit[0] == key:
        return hit[1]
    data = weight.detach()
    if unordered_dim is not None:
        data = data.movedim(unordered_dim, 0).reshape(data.shape[unordered_dim], -1)
        data = data[_canonical_order(data)]
    digest = hashlib.sha256(f"{weight.dtype}|{list(weight.shape)}|{unordered_dim}|".encode())
    flat = data.contiguous().reshape(-1).view(torch.uint8)
    for start in range(0, flat.numel(), _BYTE_CHUNK):
        digest.update(flat[start:start + _BYTE_CHUNK].cpu().numpy().tobytes())
    out = digest.hexdigest()
    _DIGESTS[weight] = (key, out)
    return out


def ffn_signature(gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor) -> list[str]:
    """A decoder layer's FFN signature: the :func:`weight_digest` of gate, up and down with their neurons unordered.

    Invariant under any permutation of the FFN neurons (gate/up rows and down columns); any other change of
    the weights changes it.
    """
    return [weight_digest(w, FFN_NEURON_DIM[p]) for p, w in zip(FFN_PROJECTIONS, (gate_w, up_w, down_w), strict=True)]


def _ffn_weights(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mlp = layer.mlp
    return mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight


def layer_signatures(model: nn.Module) -> list[list[str]]:
    """:func:`ffn_signature` of every decoder layer, in order."""
    return [ffn_signature(*_ffn_weights(layer)) for _, layer in decoder_layers(model)]


def weight_digests(model: nn.Module) -> dict[str, str]:
    """:func:`weight_digest` of every parameter by name, the FFN weights' with their neurons unordered."""
    unordered = {id(w): dim for _, layer in decoder_layers(model)
                 for w, dim in zip(_ffn_weights(layer), FFN_NEURON_DIM.values(), strict=True)}
    return {name: weight_digest(p, unordered.get(id(p))) for name, p in model.named_parameters()}


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 (hex) identifying a model's weights, invariant under in-place FFN neuron permutations.

    Hashed: the model class, the LLM's main dimensions and every parameter's name with its
    :func:`weight_digests` entry. Any change of a weight's values, dtype or layout changes it.
    """
    own = getattr(model, "config", None)
    llm = getattr(own, "llm", own)  # Show-o2 keeps its LLM's config apart; a plain LLM's is its own
    config = {key: getattr(llm, key, None) for key in
              ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
               "num_key_value_heads", "vocab_size")}
    payload = {"model": type(model).__name__, "config": config, "weights": weight_digests(model)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- the plan
def _jsonable(value):
    """Settings as JSON would give them back (tuples become lists), so a round trip compares equal."""
    return json.loads(json.dumps(value))


@dataclass(eq=False)
class Plan:
    """Task-specific FFN keep sets for every decoder layer of one model, and the digests of that model's weights.

    ``keep[task][l]`` holds the kept neuron indices of layer ``l`` (int64, sorted ascending) and
    ``scores[task][l]`` the Wanda score of every neuron (float64, length ``intermediate_sizes[l]``).
    """

    layer_paths: list[str]
    intermediate_sizes: list[int]
    keep: dict[str, list[torch.Tensor]]
    scores: dict[str, list[torch.Tensor]]
    settings: dict = field(default_factory=dict)
    fingerprint: str = ""
    layer_signatures: list[list[str]] = field(default_factory=list)
    weight_digests: dict[str, str] = field(default_factory=dict)  # every parameter's, by name (weight_digests())

    @classmethod
    def for_model(cls, model: nn.Module, keep: dict[str, list[torch.Tensor]], scores: dict[str, list[torch.Tensor]],
                  settings: dict | None = None) -> Plan:
        """A plan of ``keep`` sets and ``scores`` for ``model``'s decoder layers, with the model's layer paths, FFN
        sizes, fingerprint, layer signatures and weight digests; validated."""
        layers = decoder_layers(model)
        plan = cls([path for path, _ in layers], [layer.mlp.down_proj.in_features for _, layer in layers], keep,
                   scores, dict(settings or {}), model_fingerprint(model), layer_signatures(model),
                   weight_digests(model))
        plan.validate()
        return plan

    # ----------------------------------------------------------------- views
    @property
    def tasks(self) -> list[str]:
        """Task names in calibration order."""
        return list(self.keep)

    @property
    def num_layers(self) -> int:
        return len(self.layer_paths)

    def summary(self) -> str:
        """One line: layers, kept neurons per task, mean t2i/mmu overlap, settings, fingerprint."""
        sizes = sorted(set(self.intermediate_sizes))
        ffn = "/".join(str(s) for s in sizes)
        kept = ", ".join(
            f"{task} keeps {sum(len(k) for k in self.keep[task])}/{sum(self.intermediate_sizes)}" for task in self.tasks
        )
        jaccards = [row["jaccard"] for row in specialization(self) if row["jaccard"] is not None]
        overlap = f", mean t2i/mmu Jaccard {sum(jaccards) / len(jaccards):.3f}" if jaccards else ""
        knobs = ", ".join(f"{k} {self.settings[k]}" for k in ("prune_ratio", "multiple") if k in self.settings)
        return (f"plan: {self.num_layers} layers (FFN {ffn}); {kept}{overlap}"
                f"{'; ' + knobs if knobs else ''}; model {self.fingerprint[:12] or '?'}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented

        def same(a: dict[str, list[torch.Tensor]], b: dict[str, list[torch.Tensor]]) -> bool:
            if list(a) != list(b) or any(len(a[t]) != len(b[t]) for t in a):
                return False
            return all(x.dtype == y.dtype and torch.equal(x, y)
                       for t in a for x, y in zip(a[t], b[t], strict=True))

        return (self.layer_paths == other.layer_paths and self.intermediate_sizes == other.intermediate_sizes
                and same(self.keep, other.keep) and same(self.scores, other.scores)
                and _jsonable(self.settings) == _jsonable(other.settings) and self.fingerprint == other.fingerprint
                and self.layer_signatures == other.layer_signatures and self.weight_digests == other.weight_digests)

    __hash__ = None  # mutable container of tensors

    def __repr__(self) -> str:
        # Short: a plan is printed in dynamo's guard and recompile logs, where its tensors would run to pages.
        return f"Plan({self.summary()})"

    # ----------------------------------------------------------------- checks
    def validate(self) -> None:
        """Raise :class:`PlanError` if the contents are inconsistent (shapes, ranges, order, counts)."""
        n = len(self.layer_paths)
        if len(self.intermediate_sizes) != n:
            raise PlanError(f"plan has {n} layer paths but {len(self.intermediate_sizes)} intermediate sizes")
        if len(self.layer_signatures) != n or any(len(sig) != len(FFN_PROJECTIONS) for sig in self.layer_signatures):
            raise PlanError(f"plan has {n} layer paths but {len(self.layer_signatures)} layer signatures (three "
                            "digests each)")
        if not self.weight_digests:
            raise PlanError("plan records no weight digests, so it cannot be checked against a model; make plans "
                            "with calibrate() or calibrate_lm()")
        if not self.keep:
            raise PlanError("plan has no tasks")
        if set(self.keep) != set(self.scores):
            raise PlanError(f"plan tasks differ between keep {sorted(self.keep)} and scores {sorted(self.scores)}")
        if any(not isinstance(size, int) or isinstance(size, bool) or size < 1 for size in self.intermediate_sizes):
            raise PlanError(f"plan intermediate sizes must be positive integers, got {self.intermediate_sizes}")
        ratio, multiple = self.settings.get("prune_ratio"), self.settings.get("multiple")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                                  or not 0 <= ratio < 1):
            raise PlanError(f"plan setting prune_ratio must be a number in [0, 1), got {ratio!r}")
        if multiple is not None and (isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1):
            raise PlanError(f"plan setting multiple must be a positive integer, got {multiple!r}")
        for task in self.keep:
            if len(self.keep[task]) != n or len(self.scores[task]) != n:
                raise PlanError(f"task {task!r} has {len(self.keep[task])} keep sets and {len(self.scores[task])} "
                                f"score vectors for {n} layers")
            for path, size, kept, scores in zip(self.layer_paths, self.intermediate_sizes, self.keep[task],
                                                self.scores[task], strict=True):
                where = f"task {task!r}, layer {path}"
                if kept.dim() != 1 or kept.dtype != torch.int64:
                    raise PlanError(f"{where}: kept indices must be a 1-D int64 tensor, got {kept.dtype} "
                                    f"{tuple(kept.shape)}")
                if scores.shape != (size,):
                    raise PlanError(f"{where}: expected {size} scores, got shape {tuple(scores.shape)}")
                if len(kept) and (int(kept.min()) < 0 or int(kept.max()) >= size):
                    raise PlanError(f"{where}: kept indices out of range [0, {size})")
                if len(kept) > 1 and not bool((kept[1:] > kept[:-1]).all()):
                    what = "duplicates" if len(torch.unique(kept)) != len(kept) else "not sorted"
                    raise PlanError(f"{where}: kept indices must be sorted ascending without duplicates ({what})")
                if ratio is not None and multiple is not None:
                    expected = keep_count(size, ratio, multiple)
                    if len(kept) != expected:
                        raise PlanError(f"{where}: {len(kept)} kept neurons, but prune_ratio {ratio} and "
                                        f"multiple {multiple} keep {expected} of {size}")
                elif not 0 < len(kept) <= size:
                    raise PlanError(f"{where}: {len(kept)} kept neurons of {size}")

    def verify_layer(self, index: int, gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor) -> None:
        """Raise :class:`PlanError` unless these FFN weights are the ones layer ``index`` was calibrated on.

        Any permutation of the neurons passes; changed values, another dtype or layout do not.
        """
        self._check_ffn_shapes(index, gate_w, up_w, down_w)
        self._check_signature(index, ffn_signature(gate_w, up_w, down_w))

    def verify_ffns(self, layers: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """Raise :class:`PlanError` unless ``layers``, every decoder layer's ``(path, gate, up, down)``
        weights in order, are the ones this plan was calibrated on: as many layers, the same paths,
        FFN sizes and signatures (as :meth:`verify_layer`).

        Every layer is checked before this returns and nothing is modified, so a caller that permutes
        weights only afterwards never leaves a model half permuted. The message names the first
        mismatching layer, or the layer counts.
        """
        if len(layers) != self.num_layers:
            raise PlanError(f"the plan covers {self.num_layers} decoder layers but the model has {len(layers)}")
        for index, (path, *weights) in enumerate(layers):
            if path != self.layer_paths[index]:
                raise PlanError(f"decoder layer {index} is {path}, the plan's is {self.layer_paths[index]}")
            self._check_ffn_shapes(index, *weights)
        for index, (_, *weights) in enumerate(layers):
            self._check_signature(index, ffn_signature(*weights))

    def verify_weights(self, weights: list[tuple[str, torch.Tensor, int | None]]) -> None:
        """Raise :class:`PlanError` unless every ``(name, weight, unordered dim)`` is a weight of the model this plan
        was calibrated on (its :func:`weight_digest`, with the FFN neurons along ``unordered dim``, is the plan's).

        What a compiled graph checks: it reads some of the model's weights, under names of its own.
        """
        self.validate()
        known = set(self.weight_digests.values())
        for name, weight, unordered_dim in weights:
            if weight_digest(weight, unordered_dim) not in known:
                raise PlanError(f"plan was calibrated for a different model: weight {name} {tuple(weight.shape)} "
                                f"{weight.dtype} is none of its weights (changed, converted, transposed or from "
                                f"another model; plan fingerprint {self.fingerprint[:12]})")

    def _check_ffn_shapes(self, index: int, gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor) -> None:
        if not 0 <= index < len(self.layer_signatures):
            raise PlanError(f"plan has no layer {index} (it covers {len(self.layer_signatures)} layers)")
        path, size = self.layer_paths[index], self.intermediate_sizes[index]
        shapes = (tuple(gate_w.shape), tuple(up_w.shape), tuple(down_w.shape))
        if shapes[0][0] != size or shapes[1][0] != size or shapes[2][-1] != size:
            raise PlanError(f"layer {path}: the plan has {size} FFN neurons but the weights have shapes {shapes}")

    def _check_signature(self, index: int, actual: list[str]) -> None:
        expected = self.layer_signatures[index]
        if actual != expected:
            which = [p for p, a, e in zip(FFN_PROJECTIONS, actual, expected, strict=True) if a != e]
            raise PlanError(f"layer {self.layer_paths[index]}: FFN weights {', '.join(which)} differ from the ones "
                            f"the plan was calibrated on (values, dtype or layout)")

    def verify_model(self, model: nn.Module) -> None:
        """Raise :class:`PlanError` (naming the first difference) unless ``model`` has this plan's fingerprint."""
        actual = model_fingerprint(model)
        if actual == self.fingerprint:
            return
        layers = decoder_layers(model)
        if [path for path, _ in layers] != self.layer_paths:
            why = f"decoder layers {[p for p, _ in layers]} vs {self.layer_paths}"
        elif [layer.mlp.gate_proj.out_features for _, layer in layers] != self.intermediate_sizes:
            why = f"FFN sizes {[layer.mlp.gate_proj.out_features for _, layer in layers]} vs {self.intermediate_sizes}"
        else:
            digests = weight_digests(model)
            changed = [name for name, digest in digests.items() if self.weight_digests.get(name) != digest]
            why = (f"weights {', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''} differ (values, dtype or "
                   "layout)" if changed else f"parameters {sorted(set(self.weight_digests) - set(digests))[:3]} "
                   "are missing")
        raise PlanError(f"plan was calibrated for a different model: {why} "
                        f"(fingerprint {self.fingerprint[:12]} vs {actual[:12]})")

    # ----------------------------------------------------------------- files
    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for kind, table in (("keep", self.keep), ("scores", self.scores)):
            for task, per_layer in table.items():
                for i, t in enumerate(per_layer):
                    out[f"{kind}.{task}.{i}"] = t.detach().cpu().contiguous()
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as the directory ``path`` (``plan.safetensors`` + ``plan.json``); returns it.

        Written whole (:func:`files.replacing_dir`): into a new directory next to ``path`` that then
        replaces it, so an error never leaves a half-written plan and never destroys the previous one.
        An existing ``path`` is replaced only if it is empty or a plan directory.
        """
        from safetensors.torch import save_file

        self.validate()
        for task in self.tasks:
            if not task or "." in task:
                raise PlanError(f"task name {task!r} cannot be stored (empty or contains '.')")
        target = Path(path)
        if target.exists() and not _is_plan_dir(target):
            raise PlanError(f"{target} exists and is not a plan directory; refusing to replace it")
        with replacing_dir(target) as tmp:
            save_file(self._tensors(), str(tmp / TENSORS_FILE), metadata={"format": FORMAT})
            meta = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "tasks": self.tasks,
                "layer_paths": list(self.layer_paths),
                "intermediate_sizes": [int(s) for s in self.intermediate_sizes],
                "settings": _jsonable(self.settings),
                "fingerprint": self.fingerprint,
                "layer_signatures": [list(sig) for sig in self.layer_signatures],
                "weight_digests": dict(self.weight_digests),
                "tensors_sha256": sha256_file(tmp / TENSORS_FILE),
            }
            meta["meta_sha256"] = _meta_digest(meta)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        return target

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> Plan:
        """Read a plan written by :meth:`save`; with ``model``, also check it was calibrated for it.

        Every problem (missing or corrupt files, another format version, inconsistent contents,
        a fingerprint mismatch) raises :class:`PlanError` naming it.
        """
        from safetensors.torch import load_file

        folder = Path(path)
        if not folder.is_dir():
            raise PlanError(f"plan directory {folder} does not exist")
        for name in (META_FILE, TENSORS_FILE):
            if not (folder / name).is_file():
                raise PlanError(f"plan {folder} is missing {name}")
        try:
            meta = json.loads((folder / META_FILE).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PlanError(f"{folder / META_FILE} is not valid JSON (corrupt or truncated): {err}") from err
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise PlanError(f"{folder / META_FILE} is not a flashu plan")
        if meta.get("version") != FORMAT_VERSION:
            raise PlanError(f"{folder} has plan format version {meta.get('version')!r}; this flashu-compile reads "
                            f"version {FORMAT_VERSION}, whose weight digests tell transposed or changed weights "
                            "apart (recalibrate to get a current plan)")
        if meta.get("meta_sha256") != _meta_digest(meta):
            raise PlanError(f"{folder / META_FILE} does not match its own digest (edited or corrupt)")
        if sha256_file(folder / TENSORS_FILE) != meta.get("tensors_sha256"):
            raise PlanError(f"{folder / TENSORS_FILE} does not match {META_FILE} (corrupt, truncated or "
                            "from another plan)")
        try:
            tensors = load_file(str(folder / TENSORS_FILE))
        except Exception as err:  # safetensors raises its own error types for malformed files
            raise PlanError(f"{folder / TENSORS_FILE} is not a valid safetensors file: {err}") from err
        try:
            tasks, paths = _entry(meta, "tasks", str), _entry(meta, "layer_paths", str)
            n = len(paths)
            signatures = _entry(meta, "layer_signatures", list)
            settings, digests = meta.get("settings"), meta.get("weight_digests")
            if not isinstance(settings, dict) or not isinstance(meta.get("fingerprint"), str):
                raise ValueError("settings must be an object and fingerprint a string")
            if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
                raise ValueError("weight_digests must be an object of strings")
            plan = cls(
                layer_paths=paths,
                intermediate_sizes=_entry(meta, "intermediate_sizes", int),
                keep={t: [tensors.pop(f"keep.{t}.{i}") for i in range(n)] for t in tasks},
                scores={t: [tensors.pop(f"scores.{t}.{i}") for i in range(n)] for t in tasks},
                settings=settings,
                fingerprint=meta["fingerprint"],
                layer_signatures=[_entry({"signature": sig}, "signature", str) for sig in signatures],
                weight_digests=digests,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise PlanError(f"plan {folder} is incomplete or malformed: missing or bad entry {err}") from err
        if tensors:
            raise PlanError(f"plan {folder} has unexpected tensors {sorted(tensors)[:5]}")
        plan.validate()
        if model is not None:
            plan.verify_model(model)
        return plan


def _is_plan_dir(folder: Path) -> bool:
    """A directory holding nothing but plan files (or nothing): safe to replace."""
    return folder.is_dir() and all(p.name in (META_FILE, TENSORS_FILE) and p.is_file() for p in folder.iterdir())


def _entry(meta: dict, key: str, kind: type) -> list:
    """``meta[key]``, which must be a list of ``kind`` (never a bool for an int)."""
    value = meta[key]
    if not isinstance(value, list) or any(not isinstance(v, kind) or isinstance(v, bool) for v in value):
        raise ValueError(f"{key!r} must be a list of {kind.__name__} values")
    return value


def _meta_digest(meta: dict) -> str:
    """SHA-256 of ``plan.json``'s contents without its own digest, independent of the JSON's layout."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


PAIR = ("t2i", "mmu")


def _jaccard(a: set[int], b: set[int]) -> float:
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def specialization(plan: Plan) -> list[dict]:
    """One dict per layer: ``layer`` (index), ``path``, ``intermediate_size``, ``kept`` (task -> count),
    and when the plan has both t2i and mmu: ``shared``, ``t2i_only``, ``mmu_only`` counts and their
    ``jaccard`` overlap (``None`` otherwise)."""
    both = all(task in plan.keep for task in PAIR)
    rows = []
    for i, (path, size) in enumerate(zip(plan.layer_paths, plan.intermediate_sizes, strict=True)):
        row: dict = {"layer": i, "path": path, "intermediate_size": size,
                     "kept": {task: len(plan.keep[task][i]) for task in plan.tasks},
                     "shared": None, "t2i_only": None, "mmu_only": None, "jaccard": None}
        if both:
            gen, und = (set(plan.keep[task][i].tolist()) for task in PAIR)
            row.update(shared=len(gen & und), t2i_only=len(gen - und), mmu_only=len(und - gen),
                       jaccard=_jaccard(gen, und))
        rows.append(row)
    return rows
