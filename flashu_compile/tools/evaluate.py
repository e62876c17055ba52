"""``flashu-compile evaluate``: task quality of flashu configurations, with paired bootstrap intervals.

GenEval-like scores (per scene kind and overall, ``--images-per-prompt`` images per held-out
caption) and VQA accuracy (overall and per question type) of the scenes model, as
:mod:`flashu_compile.scenes.evaluate` measures them, for each configuration. All configurations
score the same captions and questions with the same noise per caption and image, so their
differences come from what they compute; each score has a 95% bootstrap interval and each
difference from the first configuration a paired one (resampling captions and questions).

Configurations: ``--config NAME=PRESET[,KEY=VALUE...]``, repeatable (values as JSON, or bare
words), e.g. ``--config off=off --config paper=paper --config skip=off,passes=[\"layer_skip\"]``;
without ``--config``: ``off``, then ``--preset`` with the ``-O KEY=VALUE`` options (as graph-diff
names one configuration). With ``--config``, ``-O`` applies to every configuration. ``--lowering``
and ``--plan`` always apply to all. Every input is checked before the model loads.

Resuming: ``--json`` is rewritten after each configuration scored, so an interrupted run loses at
most the one in progress. Run again with the same ``--json``, a report of the same run settings
(:func:`run_settings`) gives every configuration it holds with the same options (as the report
records them: a plan as its path or ``calibrated``) instead of scoring it again; the others are
scored, and the tables and report cover this command line's configurations, in its order. A
report of other run settings, or a file that is not a report, is refused (``--no-resume``
replaces it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from ..files import write_atomic
from ..models.showo2.sampling import check_solver
from ..options import FlashUOptions
from ..passes.manager import outcomes_text, pass_outcomes
from ..runtime.summary import summary
from ..scenes.dataset import make_split
from ..scenes.evaluate import BOOTSTRAP_RESAMPLES, compare, evaluate, markdown_tables
from ..tasks import compile_tasks
from ..validate import MAX_GUIDANCE, MAX_SEED, MAX_STEPS, check_float, check_int
from . import common
from .common import MEASURED_MODEL, check_output, model_args, parse_option


def split_top_level(text: str) -> list[str]:
    """``text`` split at the commas outside brackets, braces and double quotes (JSON values keep theirs)."""
    parts, depth, quoted, start = [], 0, False, 0
    for i, char in enumerate(text):
        if quoted:
            quoted = char != '"' or text[i - 1] == "\\"
        elif char == '"':
            quoted = True
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def parse_config(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME=PRESET[,KEY=VALUE...]`` as ``(NAME, options)``; the options are checked by the caller."""
    name, sep, rest = text.partition("=")
    if not sep or not name.strip() or not rest:
        raise ValueError(f"--config takes NAME=PRESET[,KEY=VALUE...], got {text!r}")
    preset, *overrides = split_top_level(rest)
    options: dict[str, Any] = {"preset": preset.strip()}  # "a = paper" as "a=paper"
    for item in overrides:
        key, value = parse_option(item)
        if key in options:
            raise ValueError(f"--config {name}: option {key!r} is given twice")
        options[key] = value
    return name.strip(), options


def configurations(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """The configurations ``args`` name, in order, each with the common ``-O`` options and lowering.

    Each is built with :meth:`FlashUOptions.from_dict` here, so a bad preset, key or value fails
    before any model loads; ``plan`` is added later, for the configurations that prune.
    """
    shared = dict(parse_option(o) for o in args.option)
    if "plan" in shared:
        raise ValueError("give the plan with --plan, not -O plan=...")
    if args.config:
        if args.preset is not None:
            raise ValueError("--preset names the one configuration without --config; with --config, "
                             "give each configuration its preset (NAME=PRESET)")
        named = [(name, {**shared, **options}) for name, options in map(parse_config, args.config)]
    else:
        # The baseline stays plain: -O describes the configuration it is compared with.
        preset = args.preset or "paper"
        named = [("off", {"preset": "off"})]
        if preset != "off" or shared:
            named.append((preset if not shared else f"{preset} {' '.join(args.option)}", {**shared, "preset": preset}))
    names = [name for name, _ in named]
    if len(set(names)) != len(names):
        raise ValueError(f"--config names must differ, got {names}")
    configs = []
    for name, options in named:
        options = {**options, "lowering": args.lowering}
        try:
            sampler, flashu = split_sampler(options)
            if "steps" in sampler:
                check_int("steps", sampler["steps"], 2, MAX_STEPS)
            if "solver" in sampler:
                check_solver(sampler["solver"])
            common.flashu_options(flashu)
        except ValueError as err:
            raise ValueError(f"configuration {name!r}: {err}") from None
        configs.append((name, options))
    return configs


# A configuration's sampler settings beside its flashu options: its grid points (default --steps) and solver.
SAMPLER_KEYS = ("steps", "solver")


def split_sampler(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A configuration's ``(sampler settings, flashu options)``."""
    return ({k: v for k, v in options.items() if k in SAMPLER_KEYS},
            {k: v for k, v in options.items() if k not in SAMPLER_KEYS})


def check_args(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """Every argument checked before any work; returns the configurations."""

    check_int("--steps", args.steps, 2, MAX_STEPS)
    if args.guidance is not None:
        check_float("--guidance", args.guidance, 0.0, MAX_GUIDANCE)
    check_int("--prompts", args.prompts, 1)
    check_int("--questions", args.questions, 1)
    check_int("--images-per-prompt", args.images_per_prompt, 1)
    check_int("--batch", args.batch, 1)
    check_int("--seed", args.seed, 0, MAX_SEED)
    check_int("--resamples", args.resamples, 100)
    if args.json:
        check_output("--json", args.json, folder=False)
    common.check_plan("--plan", args.plan)
    make_split(args.split, max(args.prompts, args.questions), seed=args.seed)  # the split holds enough scenes
    return configurations(args)


# A configuration's entries in a report, each a mapping from configuration name.
SCORED = ("results", "seconds", "techniques", "did")
# What a resumed configuration's result must hold: what this command prints and compare() reads.
RESULT_KEYS = ("geneval", "vqa_accuracy", "per_prompt", "per_question")


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Everything but a configuration's options that decides its scores: the model, the captions, questions and
    noise, and the sampler's steps and guidance (its default resolved)."""
    # The embedded scenes model draws best at guidance 1; a real checkpoint at the official 7.5.
    guidance = args.guidance if args.guidance is not None else 1.0 if common.scenes_model(args.model) else 7.5
    return {"model": args.model, "tokenizer": args.tokenizer, "vae": args.vae, "prompts": args.prompts,
            "images_per_prompt": args.images_per_prompt, "questions": args.questions, "steps": args.steps,
            "guidance": guidance, "seed": args.seed, "batch": args.batch, "split": args.split}


def recorded_options(args: argparse.Namespace, configs: list[tuple[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each configuration's options as the report records them: one that prunes gets ``plan``, ``--plan``'s path
    or ``"calibrated"``, so a resumed run reuses a result only if its plan came the same way."""
    plan = args.plan or "calibrated"
    return {name: {**options, "plan": plan} if FlashUOptions.from_dict(split_sampler(options)[1]).needs_plan
            else options for name, options in configs}


def _lacks(report: Any) -> str | None:
    """What a report to resume lacks first (a key, a configuration's entry), or None when it lacks nothing."""
    if not isinstance(report, dict):
        return "a JSON object"
    for key in ("settings", "configurations", *SCORED):
        if not isinstance(report.get(key), dict):
            return repr(key)
    for name in report["configurations"]:
        for key in SCORED:
            if name not in report[key]:
                return f"{key}[{name!r}]"
        result = report["results"][name]
        for key in RESULT_KEYS:
            if not isinstance(result, dict) or key not in result:
                return f"results[{name!r}][{key!r}]"
    return None


def previous_report(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The report at ``path``, to resume from: a ValueError if it is not a complete report of this command's
    entries, or if it was made with other :func:`run_settings` than ``settings`` (its scores would not compare)."""
    instead = "give another --json path, delete the file or pass --no-resume to replace it"
    try:
        report = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--json {str(path)!r} is not a report to resume ({err}): {instead}") from None
    if (lacking := _lacks(report)) is not None:
        raise ValueError(f"--json {str(path)!r} is not a report to resume (it lacks {lacking}): {instead}")
    # Reports written before the validation split existed scored the test split.
    report["settings"].setdefault("split", "test")
    for key in dict.fromkeys([*settings, *report["settings"]]):
        there, here = report["settings"].get(key, "not recorded"), settings.get(key, "not recorded")
        if there != here:
            raise ValueError(f"--json {str(path)!r} holds results of other run settings ({key}: {there!r} there, "
                             f"{here!r} here): {instead}")
    return report


def build_report(args: argparse.Namespace, settings: dict[str, Any], machine: str, shown: dict[str, dict[str, Any]],
                 scored: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The report of the configurations of ``shown`` scored so far (``scored``: each of :data:`SCORED` by name), in
    the command line's order, compared with the first of them; ``pending`` names the others."""
    names = [name for name in shown if name in scored["results"]]
    comparison = compare({name: scored["results"][name] for name in names}, resamples=args.resamples, seed=args.seed)
    return {"command": args.command_line, "machine": machine, "guidance": settings["guidance"], "settings": settings,
            "configurations": {name: shown[name] for name in names}, "pending": [n for n in shown if n not in names],
            **{key: {name: scored[key][name] for name in names} for key in SCORED}, "comparison": comparison}


def write_report(path: Path, report: dict[str, Any]) -> None:
    """``report`` as JSON at ``path``, replaced in one step: an interruption leaves the previous one whole."""
    text = json.dumps(report, indent=1, default=str)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: tmp.write_text(text))


def score(model: Any, name: str, options: dict[str, Any], args: argparse.Namespace,
          settings: dict[str, Any]) -> dict[str, Any]:
    """``model`` compiled with ``options`` and scored: the configuration's entry for each of :data:`SCORED`."""
    torch._dynamo.reset()
    with pass_outcomes() as outcomes, summary(flops=False) as done:
        sampler, flashu = split_sampler(options)
        compiled = compile_tasks(model, "flashu", flashu)
        t0 = time.perf_counter()
        result = evaluate(compiled, args.prompts, args.questions, sampler.get("steps", args.steps),
                          settings["guidance"], seed=args.seed, batch=args.batch,
                          images_per_prompt=args.images_per_prompt, label=name, progress=not args.no_progress,
                          solver=sampler.get("solver", "euler"), split=args.split)
        seconds = time.perf_counter() - t0
    return {"results": result, "seconds": seconds, "techniques": outcomes, "did": done.totals()}


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score every configuration (see the module docstring), print the comparison tables, and with ``--json``
    rewrite the report after each configuration scored; a report already there with the same run settings
    gives every configuration it holds with the same options, unless ``--no-resume``."""
    from .bench import load_plan, machine_line

    configs = check_args(args)
    settings = run_settings(args)
    shown = recorded_options(args, configs)
    path = Path(args.json) if args.json else None
    scored: dict[str, dict[str, Any]] = {key: {} for key in SCORED}
    if path is not None and path.exists() and not args.no_resume:
        previous = previous_report(path, settings)
        taken = [name for name, options in shown.items() if previous["configurations"].get(name) == options]
        scored = {key: {name: previous[key][name] for name in taken} for key in SCORED}
        dropped = [name for name in previous["configurations"] if name not in shown]
        print(f"resuming {path}: {len(taken)} of {len(shown)} configuration(s) scored there with the same options"
              + (f"; not on this command line, so left out of it: {', '.join(dropped)}" if dropped else ""))
    todo = [name for name in shown if name not in scored["results"]]
    model = common.load_model(args) if todo else None
    size = (f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters" if model is not None
            else "not loaded: every configuration is taken from the report")
    print(f"model: {args.model} ({size}); {len(shown)} configuration(s), {args.prompts} {args.split} captions x "
          f"{args.images_per_prompt} images, {args.questions} questions, {args.steps} steps (or a configuration's "
          f"own), guidance {settings['guidance']:g}, seed {args.seed}")
    plan = load_plan(args, model) if any("plan" in shown[name] for name in todo) else None
    machine = machine_line()
    for i, (name, options) in enumerate(shown.items(), start=1):
        print(f"[{i}/{len(shown)}] {name}: {json.dumps(options)}")
        if name in todo:
            entries = score(model, name, {**options, "plan": plan} if "plan" in options else options, args, settings)
            for key, entry in entries.items():
                scored[key][name] = entry
        source = f"taken from {path}: " if name not in todo else ""
        result = scored["results"][name]
        print(f"  {source}GenEval-like overall {result['geneval']['overall']:.3f}, VQA {result['vqa_accuracy']:.3f} "
              f"({scored['seconds'][name]:.0f} s)\n  techniques: {outcomes_text(scored['techniques'][name])}")
        print("  what the compiler did:" + "".join(f"\n    {line}" for line in scored["did"][name] or ["nothing"]))
        if path is not None and name in todo:
            write_report(path, build_report(args, settings, machine, shown, scored))
    report = build_report(args, settings, machine, shown, scored)
    print(f"\n{args.command_line}\n{machine}\n\n{markdown_tables(report['comparison'])}")
    if path is not None:
        if not todo:  # else the last configuration scored wrote this very report
            write_report(path, report)
        print(f"-> {path}")
    return 0


def add_parser(sub) -> None:
    """Register the ``evaluate`` subcommand on the ``flashu-compile`` subparsers ``sub``."""
    p = sub.add_parser("evaluate", help="GenEval-like and VQA scores of flashu configurations, with paired "
                       "bootstrap intervals", description=__doc__.split("\n\n")[0])
    model_args(p, default=MEASURED_MODEL)
    p.add_argument("--config", action="append", default=[], metavar="NAME=PRESET[,KEY=VALUE...]",
                   help="a configuration to evaluate (repeatable; the first is the baseline of the differences); "
                        "besides flashu options, KEY may be steps (its grid points, default --steps) or solver "
                        "(euler or heun), e.g. fast25=fast,steps=25")
    p.add_argument("--preset", help="without --config: evaluate off and this preset (default: paper)")
    p.add_argument("--option", "-O", action="append", default=[], metavar="KEY=VALUE",
                   help="a flashu option, value as JSON (e.g. -O hybrid_tau=5), repeatable: for --preset's "
                        "configuration, or with --config for every configuration")
    p.add_argument("--plan", help="a saved calibration plan (default: calibrate when a configuration prunes)")
    p.add_argument("--lowering", default="eager",
                   help="inductor, eager or tensorrt for every configuration (default eager: the same scores up to "
                        "rounding, without compile time)")
    p.add_argument("--steps", type=int, default=50, help="time-grid points per image (steps - 1 model calls)")
    p.add_argument("--guidance", type=float,
                   help="the request's guidance s0 (default: 1 for the embedded model, its best; else 7.5); "
                        "relative guidance schedules scale it")
    p.add_argument("--split", choices=("test", "validation"), default="test",
                   help="where captions and questions come from: test (reported scores) or validation (choosing "
                        "settings without reading the test split)")
    p.add_argument("--prompts", type=int, default=150, help="held-out captions for the GenEval-like score")
    p.add_argument("--images-per-prompt", type=int, default=4, help="images scored per caption (GenEval: 4)")
    p.add_argument("--questions", type=int, default=300, help="VQA questions")
    p.add_argument("--batch", type=int, default=10, help="images per generate call")
    p.add_argument("--seed", type=int, default=0, help="scenes, noise and bootstrap resamples")
    p.add_argument("--resamples", type=int, default=BOOTSTRAP_RESAMPLES, help="bootstrap resamples (at least 100)")
    p.add_argument("--json", help="write scores, intervals and every configuration's raw results to this file, "
                   "rewritten after each configuration; when it exists, a report of the same run settings (model, "
                   "counts, steps, guidance, seed, batch, split) is resumed: each configuration it holds with the same "
                   "options is taken from it, not recomputed (other run settings are refused)")
    p.add_argument("--no-resume", action="store_true",
                   help="recompute every configuration, replacing an existing --json report as the run goes")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_evaluate)
