"""FlashUOptions: every knob of the ``flashu`` backend, its presets, and strict validation.

``torch.compile(model, backend="flashu", options={...})`` hands the dict to
:meth:`FlashUOptions.from_dict`; a ``"preset"`` key picks the base values and the other keys
override them. Unknown keys, wrong types and out-of-range values raise a ``ValueError`` that
names the key and what it accepts.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any

from .runtime.request import TASKS
from .runtime.schedule import GuidanceSchedule, RelativeSchedule, check_guidance_schedule
from .validate import check_float, check_int

TASK_CHOICES = ("auto", *TASKS)  # option 'task': "auto" lets the backend infer a graph's task from its structure
LOWERINGS = ("inductor", "eager", "tensorrt")
TOKEN_DROP_ORDERS = ("highest", "lowest")
TRT_PRECISIONS = ("explicit", "bf16", "fp16")  # explicit: the graph's own dtypes


@dataclass(frozen=True)
class PassInfo:
    """What options know of a pass: enough to validate ``passes`` without importing the passes layer."""

    name: str
    order: int  # canonical position: passes run by increasing order, whatever order ``passes`` lists them in
    tasks: tuple[str, ...]  # t2i (a denoising step), mmu (an answer's prefill or decode step, or any LLM's forward)
    conflicts: Mapping[str, str]  # another pass -> why the two cannot both be enabled
    needs_plan: bool = False  # reads the calibration plan (options' ``plan``)
    decode_steps: bool = True  # rewrites an answer's decode steps too, not only its prefill
    skips_layers: bool = False  # measures layer importance and skips the least important layers


class PassCatalogue(Mapping[str, PassInfo]):
    """The passes ``passes`` may name, in canonical order.

    Options sit below the passes, so the passes declare themselves into this catalogue
    (``passes.registry.register``) rather than options importing them. Every pass module is
    imported when the ``flashu_compile`` package is (``flashu_compile.passes`` discovers them), and
    importing ``flashu_compile.options`` imports the package first: the catalogue is complete
    before any option is validated.
    """

    def __init__(self) -> None:
        self._infos: dict[str, PassInfo] = {}

    def declare(self, info: PassInfo) -> None:
        if info.name in self._infos:
            raise ValueError(f"pass {info.name!r} is declared twice")
        unknown = sorted(set(info.tasks) - set(TASKS))
        if not info.tasks or unknown:
            raise ValueError(f"pass {info.name!r}: tasks must be some of {list(TASKS)}, got {list(info.tasks)}")
        self._infos[info.name] = info
        self._infos = dict(sorted(self._infos.items(), key=lambda item: (item[1].order, item[0])))

    def withdraw(self, name: str) -> None:
        del self._infos[name]

    def __getitem__(self, name: str) -> PassInfo:
        return self._infos[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def conflict(self, names: tuple[str, ...]) -> str | None:
        """Why ``names`` cannot run together (the first conflict either side declares), or None."""
        for name in self:
            for other, why in self._infos[name].conflicts.items():
                if name in names and other in names:
                    return f"{name} does not compose with {other} ({why})"
        return None


class _PassTasks(Mapping[str, tuple[str, ...]]):
    """pass name -> the graphs it rewrites: a view of :data:`PASSES`."""

    def __getitem__(self, name: str) -> tuple[str, ...]:
        return PASSES[name].tasks

    def __iter__(self) -> Iterator[str]:
        return iter(PASSES)

    def __len__(self) -> int:
        return len(PASSES)


PASSES = PassCatalogue()
PASS_TASKS: Mapping[str, tuple[str, ...]] = _PassTasks()


@dataclass(frozen=True)
class FlashUOptions:
    """Settings of one ``flashu`` compilation (defaults: the paper's values, no pass enabled)."""

    task: str = "auto"  # which task's plan and passes apply; "auto" infers it from the graph
    lowering: str = "inductor"
    passes: tuple[str, ...] = ()
    plan: Any = None  # a calibration Plan or the path of a saved one
    prune_ratio: float = 0.2  # r_p: fraction of FFN neurons removed
    prune_multiple: int = 64  # kept neurons are rounded down to a multiple of this
    hybrid_tau: int = 11  # full FFN when step > total_steps - tau
    skip_ratio: float = 0.2  # r_LS: fraction of decoder layers skipped
    skip_interval: int = 10  # T_LS: recalculation period of the skip set
    cache_interval: int = 5  # T_cache: refresh period of the flow-head cache
    # None: the request's guidance on every call; [(steps, scale), ...]: absolute scales; {"relative": [(fraction of
    # the calls, multiple of the request's guidance), ...]}: scales relative to it (runtime.schedule.guidance_scales)
    guidance_schedule: GuidanceSchedule = None
    token_drop_layer: int = 2  # K: visual tokens are dropped after this decoder layer
    token_drop_ratio: float = 0.5  # rho: fraction of visual tokens dropped
    token_drop_order: str = "highest"  # drop the highest V-norm tokens (the paper's direction)
    step_semantics: str = "project"  # "project" or "flashu-reference" (the public code's step rules)
    decode_graphs: int = 8  # guard-free decode graphs kept, one per answer skip set (0: always the guarded graph)
    strict: bool = False  # raise instead of falling back when a pass does not apply
    debug_dir: str | None = None  # dump every graph before and after every pass here
    trt_precision: str = "explicit"  # lowering="tensorrt": the graph's dtypes, or autocast to bf16 / fp16
    trt_cache_dir: str | None = None  # TensorRT engine cache (None: $FLASHU_TRT_CACHE or ~/.cache/flashu-compile/trt)
    trt_max_size: int = 4096  # TensorRT: declared upper bound of a size dynamo made symbolic (a cache length)
    cudagraphs: bool = False  # lowering="inductor": each compiled piece replays as CUDA graphs (on a GPU)
    preset: str = "off"

    def __post_init__(self) -> None:
        _choice("task", self.task, TASK_CHOICES)
        _choice("lowering", self.lowering, LOWERINGS)
        _choice("token_drop_order", self.token_drop_order, TOKEN_DROP_ORDERS)
        _choice("step_semantics", self.step_semantics, ("project", "flashu-reference"))
        _choice("trt_precision", self.trt_precision, TRT_PRECISIONS)
        _choice("preset", self.preset, tuple(PRESETS))
        _check_passes(self.passes)
        for name in self.passes:
            _choice("passes", name, tuple(PASSES))
        if len(set(self.passes)) != len(self.passes):
            raise ValueError(f"option 'passes' lists a pass twice: {list(self.passes)}")
        if (conflict := PASSES.conflict(self.passes)) is not None:
            raise ValueError(f"option 'passes': {conflict}; enable one of them")
        for name in _FLOAT_FIELDS:
            check_float(f"option {name!r}", getattr(self, name), 0.0, 1.0, high_open=True)
        for name, low in _INT_FIELDS.items():
            check_int(f"option {name!r}", getattr(self, name), low)
        # Normalised here too (a mapping becomes a RelativeSchedule), so options built directly stay hashable.
        object.__setattr__(self, "guidance_schedule",
                           check_guidance_schedule("option 'guidance_schedule'", self.guidance_schedule))
        if self.cudagraphs and self.lowering != "inductor":
            raise ValueError(f"option 'cudagraphs' needs lowering='inductor' (Inductor captures the CUDA graphs), "
                             f"got lowering={self.lowering!r}")

    @classmethod
    def from_dict(cls, options: dict[str, Any] | FlashUOptions | None) -> FlashUOptions:
        """Build from ``torch.compile``'s ``options``: a preset, then overrides, strictly checked."""
        if options is None:
            return cls()
        if isinstance(options, FlashUOptions):
            return options
        if not isinstance(options, dict):
            raise ValueError(f"flashu options must be a dict, got {type(options).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(options) - set(known), key=repr)  # keys of any type: never a TypeError
        if unknown:
            raise ValueError(f"unknown flashu option(s) {unknown}; valid options: {sorted(known)}")
        preset = options.get("preset", "off")
        _choice("preset", preset, tuple(PRESETS))
        values = dict(PRESETS[preset])
        for key, value in options.items():
            values[key] = _coerce(key, value, known[key])
        return cls(**values)

    @property
    def by_preset(self) -> bool:
        """Whether the passes are a preset's own (not named by the user), which span both tasks by design."""
        return self.preset != "off" and self.passes == tuple(PRESETS[self.preset]["passes"])

    @property
    def needs_plan(self) -> bool:
        """Whether an enabled pass reads the calibration plan."""
        return any(PASSES[name].needs_plan for name in self.passes)

    def replace(self, **changes: Any) -> FlashUOptions:
        return dataclasses.replace(self, **changes)


def _choice(name: str, value: Any, valid: tuple[str, ...]) -> None:
    # Not ``in``: an unhashable or oddly comparing value must get this error, not a TypeError.
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"option {name!r} must be one of {list(valid)}, got {value!r}")


def _check_passes(value: Any) -> list[str]:
    """``passes`` is a list or tuple of names (``None`` or a single string is a mistake, not "no passes")."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"option 'passes' must be a list of pass names from {list(PASSES)}, "
                         f"got {type(value).__name__} {value!r}")
    return list(value)


# Integer options and their smallest value; the ratios are fractions in [0, 1).
_INT_FIELDS = {"prune_multiple": 1, "hybrid_tau": 0, "skip_interval": 1, "cache_interval": 1, "token_drop_layer": 0,
               "decode_graphs": 0, "trt_max_size": 1}
_FLOAT_FIELDS = ("prune_ratio", "skip_ratio", "token_drop_ratio")
_STR_FIELDS = {"task", "lowering", "token_drop_order", "step_semantics", "preset", "trt_precision"}


def _coerce(key: str, value: Any, spec: dataclasses.Field) -> Any:
    """Type-check one option (ints are accepted where floats are expected, never bools)."""
    def wrong(expected: str) -> ValueError:
        return ValueError(f"option {key!r} must be {expected}, got {type(value).__name__} {value!r}")

    if key in _INT_FIELDS:
        return check_int(f"option {key!r}", value)
    if key in _FLOAT_FIELDS:
        return check_float(f"option {key!r}", value)
    if key in _STR_FIELDS:
        if not isinstance(value, str):
            raise wrong("a str")
        return value
    if key in ("strict", "cudagraphs"):
        if not isinstance(value, bool):
            raise wrong("a bool")
        return value
    if key in ("debug_dir", "trt_cache_dir"):
        if value is not None and not isinstance(value, str):
            raise wrong("a str path or None")
        return value
    if key == "passes":
        return tuple(_check_passes(value))
    if key == "guidance_schedule":
        return check_guidance_schedule("option 'guidance_schedule'", value)
    if key == "plan":
        # A Plan object (from the calibrate layer above this one: known by what it offers) or a saved plan's path.
        if value is None or isinstance(value, (str, os.PathLike)) or hasattr(value, "verify_weights"):
            return value
        raise wrong("a Plan or the path of a saved plan")
    return value


PAPER_GUIDANCE = RelativeSchedule(((0.7, 0.75), (0.3, 1.0)))
FAST_GUIDANCE = RelativeSchedule(((0.5, 1.0), (0.5, 0.0)))

PRESETS: dict[str, dict[str, Any]] = {
    # A plain, correct backend: everything later is measured against it.
    "off": {"preset": "off"},
    # The paper's defaults with the project's step rules (docs/presets.md); guidance 0.75 s0 for the first 70% of
    # the calls and s0 for the last 30%, s0 being the request's guidance, as the paper defines it.
    "paper": {"preset": "paper", "passes": ("prune_channels", "token_drop", "layer_skip", "head_cache"),
              "guidance_schedule": PAPER_GUIDANCE},
    # The public FlashU code's exact step semantics (it has no understanding-side technique). Its absolute
    # [(24, 7.5), (11, 10.0)] at 35 grid points is this relative schedule at s0 = 10, call for call.
    "flashu-reference": {"preset": "flashu-reference", "passes": ("prune_channels", "layer_skip", "head_cache"),
                         "guidance_schedule": PAPER_GUIDANCE, "step_semantics": "flashu-reference"},
    # Beyond the paper (docs/presets.md; a small run in docs/fidelity.md): no layer skipping, whose loss the
    # exact prefix cache avoids while saving the text rows' work; guidance s0 on the first half of the calls
    # and off after (scale 0 runs the conditional rows alone: half the batch), where the layout is set.
    "fast": {"preset": "fast", "passes": ("prune_channels", "token_drop", "prefix_cache", "head_cache"),
             "guidance_schedule": FAST_GUIDANCE},
}

__all__ = ["FAST_GUIDANCE", "LOWERINGS", "PAPER_GUIDANCE", "PASSES", "PASS_TASKS", "PRESETS", "TASK_CHOICES", "TASKS",
           "FlashUOptions", "PassCatalogue", "PassInfo"]
