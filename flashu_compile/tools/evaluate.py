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
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..files import write_atomic
from ..options import FlashUOptions
from ..passes.manager import PassRecord, observe_passes
from ..runtime.summary import summary
from ..scenes.dataset import make_split
from ..scenes.evaluate import BOOTSTRAP_RESAMPLES, compare, evaluate, markdown_tables
from ..tasks import compile_tasks
from ..validate import MAX_GUIDANCE, MAX_SEED, MAX_STEPS, check_float, check_int
from . import common
from .common import check_output, model_args, parse_option


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
            common.flashu_options(options)
        except ValueError as err:
            raise ValueError(f"configuration {name!r}: {err}") from None
        configs.append((name, options))
    return configs


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
    make_split("test", max(args.prompts, args.questions), seed=args.seed)  # the split holds enough scenes
    return configurations(args)


def _collector(records: list[PassRecord]) -> Callable:
    """A pass observer appending each pass's record to ``records``."""
    def seen(name: str, when: str, gm: Any, context: Any, record: PassRecord | None) -> None:
        if when == "after" and record is not None:
            records.append(record)
    return seen


def techniques(records: list[PassRecord]) -> dict[str, dict[str, Any]]:
    """Per pass that ran on some graph: on how many graphs it acted, and why it did not on the others (reason ->
    graphs), so a configuration can never silently measure less than its name says."""
    out: dict[str, dict[str, Any]] = {}
    for record in records:
        entry = out.setdefault(record.name, {"acted": 0, "did_not": {}})
        if record.changed:
            entry["acted"] += 1
        else:
            why = record.skipped_reason or "changed nothing"
            entry["did_not"][why] = entry["did_not"].get(why, 0) + 1
    return out


def techniques_text(outcomes: dict[str, dict[str, Any]]) -> str:
    if not outcomes:
        return "none ran"
    parts = []
    for name, entry in outcomes.items():
        missed = "; ".join(f"not on {n}: {why}" for why, n in entry["did_not"].items())
        parts.append(f"{name} acted on {entry['acted']} graph(s){' (' + missed + ')' if missed else ''}")
    return ", ".join(parts)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .bench import load_plan, machine_line

    configs = check_args(args)
    model = common.load_model(args)
    # The embedded scenes model draws best at guidance 1; a real checkpoint at the official 7.5.
    guidance = args.guidance if args.guidance is not None else 1.0 if args.model == "default" else 7.5
    print(f"model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters); "
          f"{len(configs)} configuration(s), {args.prompts} captions x {args.images_per_prompt} images, "
          f"{args.questions} questions, {args.steps} steps, guidance {guidance:g}, seed {args.seed}")
    if any(FlashUOptions.from_dict(options).needs_plan for _, options in configs):
        plan = load_plan(args, model)
        configs = [(name, {**options, "plan": plan}) for name, options in configs]
    results, seconds, acted, did = {}, {}, {}, {}
    for i, (name, options) in enumerate(configs, start=1):
        print(f"[{i}/{len(configs)}] {name}: {json.dumps({k: v for k, v in options.items() if k != 'plan'})}")
        torch._dynamo.reset()
        records: list[PassRecord] = []
        with observe_passes(_collector(records)), summary(flops=False) as done:
            compiled = compile_tasks(model, "flashu", options)
            t0 = time.perf_counter()
            results[name] = evaluate(compiled, args.prompts, args.questions, args.steps, guidance, seed=args.seed,
                                     batch=args.batch, images_per_prompt=args.images_per_prompt, label=name,
                                     progress=not args.no_progress)
            seconds[name] = time.perf_counter() - t0
        acted[name] = techniques(records)
        result = results[name]
        print(f"  GenEval-like overall {result['geneval']['overall']:.3f}, VQA {result['vqa_accuracy']:.3f} "
              f"({seconds[name]:.0f} s)\n  techniques: {techniques_text(acted[name])}")
        did[name] = done.totals()
        print("  what the compiler did:" + "".join(f"\n    {line}" for line in did[name] or ["nothing"]))
    comparison = compare(results, resamples=args.resamples, seed=args.seed)
    tables = markdown_tables(comparison)
    machine = machine_line()
    print(f"\n{args.command_line}\n{machine}\n\n{tables}")
    if args.json:
        shown = {name: {k: (v if k != "plan" else "calibrated" if not args.plan else args.plan)
                        for k, v in options.items()} for name, options in configs}
        report = {"command": args.command_line, "machine": machine, "guidance": guidance, "configurations": shown,
                  "seconds": seconds, "techniques": acted, "did": did, "comparison": comparison, "results": results}
        text = json.dumps(report, indent=1, default=str)
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: tmp.write_text(text))
        print(f"-> {path}")
    return 0


def add_parser(sub) -> None:
    """Register the ``evaluate`` subcommand on the ``flashu-compile`` subparsers ``sub``."""
    p = sub.add_parser("evaluate", help="GenEval-like and VQA scores of flashu configurations, with paired "
                       "bootstrap intervals", description=__doc__.split("\n\n")[0])
    model_args(p)
    p.add_argument("--config", action="append", default=[], metavar="NAME=PRESET[,KEY=VALUE...]",
                   help="a configuration to evaluate (repeatable; the first is the baseline of the differences)")
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
    p.add_argument("--prompts", type=int, default=150, help="held-out captions for the GenEval-like score")
    p.add_argument("--images-per-prompt", type=int, default=4, help="images scored per caption (GenEval: 4)")
    p.add_argument("--questions", type=int, default=300, help="VQA questions")
    p.add_argument("--batch", type=int, default=10, help="images per generate call")
    p.add_argument("--seed", type=int, default=0, help="scenes, noise and bootstrap resamples")
    p.add_argument("--resamples", type=int, default=BOOTSTRAP_RESAMPLES, help="bootstrap resamples (at least 100)")
    p.add_argument("--json", help="write scores, intervals and every configuration's raw results to this file")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_evaluate)
