"""The ``flashu-compile calibrate`` subcommand: calibrate a model, save its plan, report specialization."""

from __future__ import annotations

import argparse
import sys
import time

from ..validate import MAX_GUIDANCE, MAX_SEED, MAX_STEPS, check_float, check_int
from . import common
from .common import check_output, model_args


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Calibrate, save the plan to ``--out``, print the specialization table, draw ``<out>-specialization.png``."""
    from ..calibrate.report import draw_specialization, format_specialization
    from ..calibrate.scores import calibrate

    # Calibrating takes minutes: every argument and the output folder are checked first.
    check_float("--prune-ratio", args.prune_ratio, 0.0, 1.0, high_open=True)
    check_int("--multiple", args.multiple, 1)
    check_int("--steps", args.steps, 2, MAX_STEPS)
    check_float("--guidance", args.guidance, 0.0, MAX_GUIDANCE)
    check_int("--seed", args.seed, 0, MAX_SEED)
    check_int("--samples", args.samples, 1)
    check_int("--batch-size", args.batch_size, 1)
    out = check_output("--out", args.out, folder=True, whole=True)
    t0 = time.perf_counter()
    model = common.load_model(args)
    print(f"model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters), "
          f"loaded in {time.perf_counter() - t0:.2f} s")
    t0 = time.perf_counter()
    plan = calibrate(model, tasks=args.tasks, prune_ratio=args.prune_ratio, multiple=args.multiple, steps=args.steps,
                     guidance=args.guidance, seed=args.seed, progress=not args.no_progress, samples=args.samples,
                     batch_size=args.batch_size)
    tokens = ", ".join(f"{task} {n} tokens" for task, n in plan.settings["tokens"].items())
    print(f"calibrated in {time.perf_counter() - t0:.2f} s ({tokens})")
    plan.save(out)
    print(f"plan -> {out}")
    print(plan.summary())
    print(format_specialization(plan))
    png = out.with_name(out.name + "-specialization.png")
    try:
        draw_specialization(plan, png)
        print(f"specialization chart -> {png}")
    except ImportError as err:  # the plan is the product; the chart is optional
        print(f"note: {err}", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    """Register the ``calibrate`` subcommand on the ``flashu-compile`` subparsers ``sub``."""
    from ..calibrate.scores import DEFAULT_SAMPLES, TASKS

    p = sub.add_parser("calibrate", help="score FFN neurons per task (Wanda) and save a pruning plan",
                       description="Calibrate task-specific FFN keep sets and save them as a plan directory.")
    model_args(p)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--prune-ratio", type=float, default=0.2, help="fraction of FFN neurons to prune per layer")
    p.add_argument("--multiple", type=int, default=64, help="kept neurons are rounded down to a multiple of this")
    p.add_argument("--steps", type=int, default=10, help="time-grid points of the t2i calibration runs")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                   help="prompts and image+question pairs drawn from the scenes training split")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per t2i calibration batch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", default="plans/default", help="plan directory to write")
    p.set_defaults(func=cmd_calibrate)
