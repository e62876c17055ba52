"""``flashu-compile bench``: arguments, checked before any work, and the command."""

from __future__ import annotations

from pathlib import Path

import torch

from .harness import Bench
from .loading import DTYPES, check_device, load_model, load_plan, machine_line, random_latents
from .report import write
from .rows import Result, default_configs, select

DESCRIPTION = ("``flashu-compile bench``: speed, FLOPs, memory and fidelity of each way of running a model, "
               "side by side.")


def check_args(args) -> tuple[torch.device, torch.dtype]:
    """Every argument of ``bench`` checked before any work; returns the device and dtype."""
    from ...scenes.dataset import make_split
    from ...validate import MAX_GUIDANCE, MAX_SEED, check_float, check_int
    from ..common import check_output, check_plan

    check_int("--runs", args.runs, 1)
    if args.compile_warm_runs is not None:
        if args.no_compile_warm:
            raise ValueError("--no-compile-warm leaves out the warm start that --compile-warm-runs repeats: "
                             "give one of them")
        check_int("--compile-warm-runs", args.compile_warm_runs, 1)
    check_int("--prompts", args.prompts, 1)
    check_int("--max-new-tokens", args.max_new_tokens, 1)
    check_float("--guidance", args.guidance, 0.0, MAX_GUIDANCE)
    check_int("--seed", args.seed, 0, MAX_SEED)
    try:
        make_split("test", args.prompts + 1, seed=args.seed)
    except ValueError as err:
        raise ValueError(f"--prompts {args.prompts} and the question's scene: {err}") from None
    check_output("--out", args.out, folder=True)
    check_plan("--plan", args.plan)
    if args.dtype not in DTYPES:  # argparse's choices say so on the command line; this guards direct callers
        raise ValueError(f"--dtype must be one of {list(DTYPES)}, got {args.dtype!r}")
    if args.only:
        select(default_configs(None, split=True, cudagraphs=True), args.only)  # a typo fails before the model loads
    return check_device(args.device), DTYPES[args.dtype]


def run_bench(args, device: torch.device, dtype: torch.dtype) -> list[Result]:
    """Load the model, calibrate (or load) its plan and measure the configurations ``args`` select."""
    from ...scenes.dataset import make_split, to_tensor
    from ..common import scenes_model

    # Up to sixteen configurations compile the same entry points with different backends and options.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    model = load_model(args, device, dtype)
    print(f"model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"{device.type}, {str(dtype).removeprefix('torch.')})")
    plan = load_plan(args, model)
    scenes = make_split("test", args.prompts + 1, seed=args.seed)
    prompts, (question, expected) = [s.caption for s in scenes[:-1]], scenes[-1].qa[0]
    if model.codec is None:
        image = random_latents(model, 1, args.seed)
    else:
        image = model.encode_image((to_tensor(scenes[-1].render()) + 1) / 2)
    # --only picks from every row, --split and the CUDA-graph rows included; without --only, --split adds the
    # per-technique rows, and a GPU the CUDA-graph rows.
    configs = select(default_configs(plan, split=args.split or bool(args.only),
                                     cudagraphs=device.type == "cuda" or bool(args.only)), args.only, plan)
    # The scenes scorers mean something only for the model trained on the scenes.
    scored = scenes_model(args.model)
    bench = Bench(model, configs, prompts, image, question, max_new_tokens=args.max_new_tokens, seed=args.seed,
                  scenes=scenes[:-1] if scored else None, expected_answer=expected if scored else None,
                  guidance=args.guidance, profile_compile=args.profile_compile)
    return bench.run(args.runs, progress=not args.no_progress, compile_warm=0 if args.no_compile_warm else
                     args.compile_warm_runs or 1,
                     fresh_caches=not args.shared_caches)


def cmd_bench(args) -> int:
    device, dtype = check_args(args)
    results = run_bench(args, device, dtype)
    print(write(results, Path(args.out), machine_line(device, dtype), args.command_line))
    print(f"-> {args.out}/bench.md, bench.json, bench.png")
    return 0


def add_parser(sub) -> None:
    """Register the ``bench`` subcommand on the ``flashu-compile`` subparsers ``sub``."""
    from ..common import MEASURED_MODEL, model_args

    p = sub.add_parser("bench", help="speed, FLOPs, memory and fidelity of eager, Inductor and flashu side by side",
                       description=DESCRIPTION)
    model_args(p, default=MEASURED_MODEL)
    p.add_argument("--plan", help="a saved calibration plan (default: calibrate the model first)")
    p.add_argument("--runs", type=int, default=5, help="warm runs per configuration (at least 1)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per text-to-image request (test scenes)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--guidance", type=float, default=7.5,
                   help="guidance s0 of the text-to-image rows, which a preset's schedule scales (default: the "
                        "official 7.5; the embedded model draws best at 1, where the sampler runs the conditional rows "
                        "alone)")
    p.add_argument("--split", action="store_true",
                   help="add one row per generation technique (prune, skip, cache, prefix, guidance at 50 steps) "
                        "and the FLOPs each saves")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="run only these configurations: by name, from the default, --split and CUDA-graph rows, or "
                        "named by what they run: 'eager N', 'inductor N', 'flashu PRESET N' (N grid points), "
                        "'flashu PRESET answer'")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the model runs (cuda: timings synchronise the device, peak GPU memory is reported)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="the model's parameter dtype")
    p.add_argument("--no-compile-warm", action="store_true",
                   help="leave out the second first request (after a dynamo reset, on warm caches), which compiles "
                        "every configuration again")
    p.add_argument("--compile-warm-runs", type=int, metavar="N",
                   help="make the second first request N times (default 1), the configurations interleaved, and "
                        "report the median (a warm start of a second or two varies by a tenth of a second run to "
                        "run)")
    p.add_argument("--shared-caches", action="store_true",
                   help="one set of Inductor caches for all configurations (faster; compile cold then counts what "
                        "earlier rows compiled as cached)")
    p.add_argument("--profile-compile", action="store_true",
                   help="time each phase of every first request (dynamo tracing, the structure index, each pass, "
                        "outlining, the lowering of each kind of piece, specializations): a table per configuration "
                        "in bench.md, and in bench.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default="outputs/bench")
    p.set_defaults(func=cmd_bench)
