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
TRT_PRECISIONS = ("explicit", "bf16", "fp16")  # explicit: the graph's own dtypes


@dataclass(frozen=True)
class Setting:
    """A pass's own option, declared with the pass (``PassSpec.settings``): its default and the values it takes.

    ``kind``: "int" (a whole number >= ``low``), "float" (a finite number >= ``low``), "fraction" (a number in
    [0, 1)) or "choice" (one of ``choices``).
    Invariant: the default is itself a valid value.
    """

    default: Any
    kind: str
    low: int = 0
    choices: tuple[str, ...] = ()
    doc: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("int", "float", "fraction", "choice") or (self.kind == "choice" and not self.choices):
            raise ValueError(f"a setting's kind must be 'int', 'float', 'fraction' or 'choice' (with choices), "
                             f"got {self.kind!r}")
        self.check("default", self.default)

    def check(self, key: str, value: Any) -> Any:
        """``value`` for option ``key`` as this setting takes it, or a ValueError naming the key."""
        if self.kind == "int":
            return check_int(f"option {key!r}", value, self.low)
        if self.kind == "float":
            return check_float(f"option {key!r}", value, self.low)
        if self.kind == "fraction":
            return check_float(f"option {key!r}", value, 0.0, 1.0, high_open=True)
        _choice(key, value, self.choices)
        return value


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
    settings: Mapping[str, Setting] = dataclasses.field(default_factory=dict)  # its own options, by option name


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
        taken = {f.name for f in fields(FlashUOptions)} | set(self.settings())
        clash = sorted(set(info.settings) & taken)
        if clash:
            raise ValueError(f"pass {info.name!r}: setting(s) {clash} are already options")
        self._infos[info.name] = info
        self._infos = dict(sorted(self._infos.items(), key=lambda item: (item[1].order, item[0])))

    def settings(self) -> dict[str, Setting]:
        """Every registered pass's own options, by option name."""
        return {key: setting for info in self._infos.values() for key, setting in info.settings.items()}

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
    hybrid_tau: int = 11  # the last tau model calls of a generation run the full network (every approximate pass off)
    # None: the request's guidance on every call; [(steps, scale), ...]: absolute scales; {"relative": [(fraction of
    # the calls, multiple of the request's guidance), ...]}: scales relative to it (runtime.schedule.guidance_scales)
    guidance_schedule: GuidanceSchedule = None
    step_semantics: str = "project"  # "project" or "flashu-reference" (the public code's step rules)
    strict: bool = False  # raise instead of falling back when a pass does not apply
    debug_dir: str | None = None  # dump every graph before and after every pass here
    trt_precision: str = "explicit"  # lowering="tensorrt": the graph's dtypes, or autocast to bf16 / fp16
    trt_cache_dir: str | None = None  # TensorRT engine cache (None: $FLASHU_TRT_CACHE or ~/.cache/flashu-compile/trt)
    trt_max_size: int = 4096  # TensorRT: declared upper bound of a size dynamo made symbolic (a cache length)
    cudagraphs: bool = False  # lowering="inductor": each compiled piece replays as CUDA graphs (on a GPU)
    preset: str = "off"
    # The passes' own options (PassSpec.settings) given a value, as sorted (name, value) pairs; read as attributes
    # (``options.token_drop_layer``), which fall back to the setting's default.
    pass_settings: tuple[tuple[str, Any], ...] = ()

    def __getattr__(self, name: str) -> Any:
        # Only reached for names that are not fields: a pass's own option.
        if name.startswith("__") or name == "pass_settings":
            raise AttributeError(name)
        declared = PASSES.settings()
        if name not in declared:
            raise AttributeError(f"{type(self).__name__!r} has no option {name!r}")
        return dict(self.pass_settings).get(name, declared[name].default)

    def __post_init__(self) -> None:
        _choice("task", self.task, TASK_CHOICES)
        _choice("lowering", self.lowering, LOWERINGS)
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
        declared = PASSES.settings()
        for key, value in self.pass_settings:
            if key not in declared:
                raise ValueError(f"unknown flashu option {key!r} among the pass settings; the passes' own options: "
                                 f"{sorted(declared)}")
            declared[key].check(key, value)
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
        known = {f.name: f for f in fields(cls) if f.name != "pass_settings"}
        declared = PASSES.settings()
        unknown = sorted(set(options) - set(known) - set(declared), key=repr)  # keys of any type: never a TypeError
        if unknown:
            raise ValueError(f"unknown flashu option(s) {unknown}; valid options: {sorted({*known, *declared})}")
        preset = options.get("preset", "off")
        _choice("preset", preset, tuple(PRESETS))
        values, settings = {}, {}
        for key, value in {**PRESETS[preset], **options}.items():
            if key in declared:
                settings[key] = declared[key].check(key, value)
            else:
                values[key] = _coerce(key, value, known[key])
        return cls(**values, pass_settings=tuple(sorted(settings.items())))

    @property
    def by_preset(self) -> bool:
        """Whether the passes are a preset's own (not named by the user), which span both tasks by design."""
        return self.preset != "off" and self.passes == tuple(PRESETS[self.preset]["passes"])

    @property
    def needs_plan(self) -> bool:
        """Whether an enabled pass reads the calibration plan."""
        return any(PASSES[name].needs_plan for name in self.passes)

    def values(self) -> dict[str, Any]:
        """Every option by name, the passes' own options included (at their defaults where not given)."""
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "pass_settings"}
        return shown | {name: getattr(self, name) for name in PASSES.settings()}

    def replace(self, **changes: Any) -> FlashUOptions:
        """A copy with ``changes``, fields and passes' own options alike."""
        declared = PASSES.settings()
        settings = dict(self.pass_settings) | {k: v for k, v in changes.items() if k in declared}
        fields_changed = {k: v for k, v in changes.items() if k not in declared}
        return dataclasses.replace(self, **fields_changed, pass_settings=tuple(sorted(settings.items())))


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


# Integer options and their smallest value (the passes' own options are declared with them: PassSpec.settings).
_INT_FIELDS = {"hybrid_tau": 0, "trt_max_size": 1}
_STR_FIELDS = {"task", "lowering", "step_semantics", "preset", "trt_precision"}


def _coerce(key: str, value: Any, spec: dataclasses.Field) -> Any:
    """Type-check one option (ints are accepted where floats are expected, never bools)."""
    def wrong(expected: str) -> ValueError:
        return ValueError(f"option {key!r} must be {expected}, got {type(value).__name__} {value!r}")

    if key in _INT_FIELDS:
        return check_int(f"option {key!r}", value)
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
           "FlashUOptions", "PassCatalogue", "PassInfo", "Setting"]
