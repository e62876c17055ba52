"""``flashu-compile graph-diff``: what every flashu pass did to a model's graphs."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ...backend import build_pass_list
from ...files import write_atomic
from ...options import FlashUOptions
from ...validate import MAX_SEED, MAX_STEPS, check_float, check_int, check_text
from .. import common
from ..common import check_output, model_args, parse_option
from .capture import graph_diff, to_json
from .render import render_html, render_terminal
from .sample import sample_call


def cmd_graph_diff(args: argparse.Namespace) -> int:
    steps = check_int("--steps", args.steps, 2, MAX_STEPS)
    check_int("--step", args.step, 1, steps - 1)  # a model call of the request: steps - 1 of them
    check_float("--tolerance", args.tolerance, 0.0, low_open=True)
    check_int("--seed", args.seed, 0, MAX_SEED)
    check_text("--prompt", args.prompt)
    check_text("--question", args.question)
    if args.out:
        check_output("--out", args.out, folder=False)
    common.check_plan("--plan", args.plan)
    options: dict[str, Any] = {"preset": args.preset, "task": args.task}
    if args.passes is not None:
        options["passes"] = args.passes
    options.update(parse_option(o) for o in args.option)
    opts = FlashUOptions.from_dict(options)  # bad options and passes fail here, before the model loads
    build_pass_list(opts)
    torch.manual_seed(args.seed)
    model = common.load_model(args)
    log = sys.stderr
    print(f"model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters)", file=log)
    if args.plan:
        options["plan"] = args.plan
    elif opts.needs_plan:
        from ...calibrate import calibrate

        t0 = time.perf_counter()
        options["plan"] = calibrate(model, steps=3, progress=False)
        print(f"calibrated a plan in {time.perf_counter() - t0:.1f} s ({options['plan'].summary()}); "
              f"--plan DIR reuses a saved one", file=log)
    fn, inputs = sample_call(model, args.task, args.prompt, args.question, args.seed)
    diff = graph_diff(fn, inputs, options, step=args.step, calls=args.steps - 1, tolerance=args.tolerance)
    title = args.command_line
    if args.format == "json":
        text = to_json(diff)
    elif args.format == "html":
        text = render_html(diff, title)
    else:
        color = not args.no_color and args.out is None and sys.stdout.isatty()
        text = render_terminal(diff, title, color=color)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(args.out), lambda tmp: tmp.write_text(text))
        print(f"-> {args.out}", file=log)
    else:
        print(text)
    return 0


def add_parser(sub) -> None:
    """Register the ``graph-diff`` subcommand on the ``flashu-compile`` subparsers ``sub``."""
    p = sub.add_parser("graph-diff", help="what every flashu pass did to the graph: modules, shapes, FLOPs, "
                       "guards, numeric divergence", description=__doc__.split("\n\n")[0])
    model_args(p)
    p.add_argument("--preset", default="paper", help="flashu options preset (off, paper, flashu-reference)")
    p.add_argument("--passes", nargs="*", metavar="PASS", help="passes to run (default: the preset's)")
    p.add_argument("--option", "-O", action="append", default=[], metavar="KEY=VALUE",
                   help="any other flashu option, value as JSON (e.g. -O skip_ratio=0.5); repeatable")
    p.add_argument("--plan", help="a saved calibration plan (default: calibrate when prune_channels runs)")
    p.add_argument("--task", choices=("t2i", "mmu"), default="t2i",
                   help="t2i: a denoising step; mmu: an understanding prefill")
    p.add_argument("--prompt", default="a red circle left of a blue square")
    p.add_argument("--question", default="what colour is the circle?")
    p.add_argument("--steps", type=int, default=50, help="time-grid points of the request guards are described for")
    p.add_argument("--step", type=int, default=2,
                   help="the model call the numeric comparison runs as (earlier calls set the guards' state)")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="a node diverges when max-abs exceeds this times the unrewritten value's largest magnitude")
    p.add_argument("--format", choices=("term", "json", "html"), default="term")
    p.add_argument("--out", help="write to this file instead of standard output")
    p.add_argument("--no-color", action="store_true", help="plain text even on a terminal")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_graph_diff)
