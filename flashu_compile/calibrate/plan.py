"""The calibration Plan: which FFN neurons each task keeps, and which model it was calibrated for.

A plan is saved as a directory ``<path>/`` holding ``plan.safetensors`` (the kept indices and the
scores, one tensor per task and layer) and ``plan.json`` (everything else, with a format version
and the SHA-256 of the tensor file, so the two files cannot be silently mixed up).

The model fingerprint must survive the FFN permutation the compiler applies later (neurons are
reordered in place as [generation-only | shared | understanding-only | neither], the same
permutation on gate/up rows and down columns, which leaves the function unchanged). So it is
built from permutation-invariant summaries only: parameter names and shapes, and per parameter
the sum, the sum of absolute values and the sum of squares. Those sums are computed *exactly*
(see :func:`_exact_sums`), so they do not depend on the order of the elements at all, not just
up to rounding noise.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import torch
from torch import nn

from ..files import replacing_dir, sha256_file
from ..graph.structure import PATTERNS

FORMAT = "flashu-plan"
FORMAT_VERSION = 2  # 2: plan.json carries the digest of its own contents
TENSORS_FILE = "plan.safetensors"
META_FILE = "plan.json"
SIGNIFICANT_DIGITS = 7
SIGNATURE_RTOL = 1e-5
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


# --------------------------------------------------------------------------- exact sums, signatures
_CHUNK = 1 << 22  # elements per vectorised pass: bounds the float64/int64 temporaries for big models
_TRANSFORMS = {"sum": lambda x: x, "abs": torch.abs, "sq": lambda x: x * x}


def _exact_sums(items: list[tuple[torch.Tensor, str]]) -> list[float]:
    """The correctly rounded sums of ``transform(tensor)`` in float64 for each ``(tensor, transform)``,
    independent of the order of the elements; ``transform`` is "sum" (identity), "abs" or "sq".

    Each float64 value is split into an integer mantissa and a binary exponent; mantissas are summed
    per (item, exponent) bucket in int64 (integer addition is associative, so order cannot matter)
    and the buckets are combined exactly with Python integers. The 53-bit mantissa is cut into two
    halves so that a pass's bucket sums stay far from int64 overflow. Many tensors are processed in a few large
    vectorised passes rather than one small pass each, which matters when threads are contended.
    """
    totals = [Fraction(0)] * len(items)
    special: set[int] = set()  # items with inf/nan: no exact sum exists, fall back to a plain one
    pending: list[tuple[int, torch.Tensor]] = []
    count = 0

    def flush() -> None:
        nonlocal pending, count
        if not pending:
            return
        # On the CPU: exactness needs int64 and float64, which not every accelerator has.
        x = torch.cat([_TRANSFORMS[items[i][1]](piece.to(device="cpu", dtype=torch.float64)) for i, piece in pending])
        ids = sorted({i for i, _ in pending})  # the items in this pass; slot = position in ids
        slot_of = {i: k for k, i in enumerate(ids)}
        slot = torch.repeat_interleave(torch.tensor([slot_of[i] for i, _ in pending]),
                                       torch.tensor([piece.numel() for _, piece in pending]))
        pending, count = [], 0
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            special.update(ids[k] for k in slot[~finite].unique().tolist())
            x = torch.where(finite, x, torch.zeros((), dtype=x.dtype))
        mantissa, exponent = torch.frexp(x)  # x = mantissa * 2**exponent, |mantissa| in [0.5, 1)
        integer = torch.ldexp(mantissa, torch.tensor(53, dtype=torch.int32)).to(torch.int64)  # exact
        high, low = integer >> 26, integer & ((1 << 26) - 1)  # integer == high * 2**26 + low
        # Float64 exponents span about 2100 values, so direct bucketing by exponent needs no sort.
        lowest = int(exponent.min())
        span = int(exponent.max()) - lowest + 1
        bucket = slot * span + (exponent - lowest).to(torch.int64)
        high_sums = torch.zeros(len(ids) * span, dtype=torch.int64).index_add_(0, bucket, high)
        low_sums = torch.zeros(len(ids) * span, dtype=torch.int64).index_add_(0, bucket, low)
        used = ((high_sums != 0) | (low_sums != 0)).nonzero().view(-1)  # few: values cluster in exponent
        exact = [0] * len(ids)  # exact integers in units of 2**(lowest - 53)
        for b, h, lo in zip(used.tolist(), high_sums[used].tolist(), low_sums[used].tolist(), strict=True):
            exact[b // span] += ((h << 26) + lo) << (b % span)
        unit = Fraction(2) ** (lowest - 53)
        for i, total in zip(ids, exact, strict=True):
            totals[i] += total * unit

    for i, (tensor, _) in enumerate(items):
        flat = tensor.detach().reshape(-1)
        for start in range(0, flat.numel(), _CHUNK):
            piece = flat[start:start + _CHUNK]
            pending.append((i, piece))
            count += piece.numel()
            if count >= _CHUNK:
                flush()
    flush()
    out = [float(t) for t in totals]
    for i in special:
        tensor, how = items[i]
        out[i] = float(_TRANSFORMS[how](tensor.detach().to(device="cpu", dtype=torch.float64)).sum())
    return out


def _round(value: float) -> float:
    """Round to ``SIGNIFICANT_DIGITS`` significant digits (stable text for hashing)."""
    return float(f"{value:.{SIGNIFICANT_DIGITS - 1}e}")


def _summaries(tensors: list[torch.Tensor]) -> list[list[float]]:
    sums = _exact_sums([(t, how) for t in tensors for how in ("sum", "abs", "sq")])
    return [[_round(v) for v in sums[3 * k:3 * k + 3]] for k in range(len(tensors))]


def tensor_summary(weight: torch.Tensor) -> list[float]:
    """``[sum, sum |w|, sum w^2]`` of a tensor in float64, exact and rounded to 7 significant digits.

    Squares of float32/bf16/fp16 values are exact in float64, and element-wise rounding (for
    float64 weights) does not depend on order either, so the summary is permutation invariant.
    """
    return _summaries([weight])[0]


def ffn_signature(gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor) -> list[float]:
    """A decoder layer's FFN signature: :func:`tensor_summary` of gate, up and down (9 numbers).

    Invariant under any permutation of the FFN neurons, i.e. of gate/up rows and down columns.
    """
    return [v for summary in _summaries([gate_w, up_w, down_w]) for v in summary]


def _ffn_weights(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mlp = layer.mlp
    return mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight


def layer_signatures(model: nn.Module) -> list[list[float]]:
    """:func:`ffn_signature` of every decoder layer, in order."""
    summaries = _summaries([w for _, layer in decoder_layers(model) for w in _ffn_weights(layer)])
    return [[v for s in summaries[3 * k:3 * k + 3] for v in s] for k in range(len(summaries) // 3)]


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 (hex) identifying a model's weights, invariant under in-place FFN neuron permutations.

    Hashed: the LLM's main dimensions, every parameter's name and shape, every decoder layer's FFN
    signature and the [sum, sum |w|, sum w^2] summary of every other parameter. Casting the model
    to another dtype changes the sums and so the fingerprint: a plan identifies exact weights.
    """
    layers = decoder_layers(model)
    ffn_params = {id(p) for _, layer in layers for p in _ffn_weights(layer)}
    own = getattr(model, "config", None)
    llm = getattr(own, "llm", own)  # Show-o2 keeps its LLM's config apart; a plain LLM's is its own
    config = {key: getattr(llm, key, None) for key in
              ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
               "num_key_value_heads", "vocab_size")}
    params = list(model.named_parameters())
    others = [(name, param) for name, param in params if id(param) not in ffn_params]
    payload = {
        "model": type(model).__name__,
        "config": config,
        "layer_paths": [path for path, _ in layers],
        "shapes": [[name, list(param.shape)] for name, param in params],
        "ffn": layer_signatures(model),
        "other": [[name, summary] for (name, _), summary in zip(others, _summaries([p for _, p in others]),
                                                                   strict=True)],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _signatures_match(expected: list[float], actual: list[float], rtol: float = SIGNATURE_RTOL) -> bool:
    if len(expected) != len(actual):
        return False
    for i, (a, b) in enumerate(zip(expected, actual, strict=True)):
        # A plain sum can cancel to nearly zero, so it is compared on the scale of sum |w|.
        scale = max(abs(a), abs(b), abs(expected[i + 1]) if i % 3 == 0 else 0.0)
        if abs(a - b) > rtol * scale:
            return False
    return True


# --------------------------------------------------------------------------- the plan
def _jsonable(value):
    """Settings as JSON would give them back (tuples become lists), so a round trip compares equal."""
    return json.loads(json.dumps(value))


@dataclass(eq=False)
class Plan:
    """Task-specific FFN keep sets for every decoder layer of one model.

    ``keep[task][l]`` holds the kept neuron indices of layer ``l`` (int64, sorted ascending) and
    ``scores[task][l]`` the Wanda score of every neuron (float64, length ``intermediate_sizes[l]``).
    """

    layer_paths: list[str]
    intermediate_sizes: list[int]
    keep: dict[str, list[torch.Tensor]]
    scores: dict[str, list[torch.Tensor]]
    settings: dict = field(default_factory=dict)
    fingerprint: str = ""
    layer_signatures: list[list[float]] = field(default_factory=list)

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
                and self.layer_signatures == other.layer_signatures)

    __hash__ = None  # mutable container of tensors

    # ----------------------------------------------------------------- checks
    def validate(self) -> None:
        """Raise :class:`PlanError` if the contents are inconsistent (shapes, ranges, order, counts)."""
        n = len(self.layer_paths)
        if len(self.intermediate_sizes) != n:
            raise PlanError(f"plan has {n} layer paths but {len(self.intermediate_sizes)} intermediate sizes")
        if self.layer_signatures and len(self.layer_signatures) != n:
            raise PlanError(f"plan has {n} layer paths but {len(self.layer_signatures)} layer signatures")
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

        Any permutation of the neurons passes; changed values or another dtype do not
        (relative tolerance 1e-5 on each of the nine sums).
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
        summaries = _summaries([w for _, *weights in layers for w in weights])  # one batched pass
        for index in range(len(layers)):
            self._check_signature(index, [v for s in summaries[3 * index:3 * index + 3] for v in s])

    def _check_ffn_shapes(self, index: int, gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor) -> None:
        if not 0 <= index < len(self.layer_signatures):
            raise PlanError(f"plan has no layer {index} (it covers {len(self.layer_signatures)} layers)")
        path, size = self.layer_paths[index], self.intermediate_sizes[index]
        shapes = (tuple(gate_w.shape), tuple(up_w.shape), tuple(down_w.shape))
        if shapes[0][0] != size or shapes[1][0] != size or shapes[2][-1] != size:
            raise PlanError(f"layer {path}: the plan has {size} FFN neurons but the weights have shapes {shapes}")

    def _check_signature(self, index: int, actual: list[float]) -> None:
        if not _signatures_match(self.layer_signatures[index], actual):
            raise PlanError(f"layer {self.layer_paths[index]}: FFN weights differ from the ones the plan was "
                            f"calibrated on (signature {self.layer_signatures[index]} vs {actual})")

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
            why = "weights outside the FFNs differ"
            try:
                self.verify_ffns([(path, *_ffn_weights(layer)) for path, layer in layers])
            except PlanError as err:
                why = str(err)
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
                "layer_signatures": [[float(v) for v in sig] for sig in self.layer_signatures],
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
                            f"version {FORMAT_VERSION} (recalibrate to get a current plan)")
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
            settings = meta.get("settings")
            if not isinstance(settings, dict) or not isinstance(meta.get("fingerprint"), str):
                raise ValueError("settings must be an object and fingerprint a string")
            plan = cls(
                layer_paths=paths,
                intermediate_sizes=_entry(meta, "intermediate_sizes", int),
                keep={t: [tensors.pop(f"keep.{t}.{i}") for i in range(n)] for t in tasks},
                scores={t: [tensors.pop(f"scores.{t}.{i}") for i in range(n)] for t in tasks},
                settings=settings,
                fingerprint=meta["fingerprint"],
                layer_signatures=[_entry({"signature": sig}, "signature", float) for sig in signatures],
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
    """``meta[key]``, which must be a list of ``kind`` (JSON numbers for float; never a bool for a number)."""
    value = meta[key]
    accepted = (int, float) if kind is float else kind
    if not isinstance(value, list) or any(not isinstance(v, accepted) or isinstance(v, bool) for v in value):
        raise ValueError(f"{key!r} must be a list of {kind.__name__} values")
    return [float(v) for v in value] if kind is float else value


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
