"""The whole GPU run of ``flashu-compile bench`` in one command: Show-o2 1.5B and 7B at the official dimensions.

    python examples/gpu_check.py [--device cuda] [--model showo2-1.5b,showo2-7b] [--out DIR]

Runs from the repository root without installing anything: the project is put on ``sys.path`` here.
Per model it runs the rows of the issue's goal for that size (``ROWS``; ``--only`` picks others)
through the same code as ``flashu-compile bench`` (``--dtype`` bfloat16 on a GPU, float32 on a CPU,
Inductor caches shared between rows, no second compile on warm caches), and after each model it
rewrites DIR/bench.md, DIR/bench.json and DIR/bench.png with every model measured so far: a run
stopped by a time limit still leaves the models it finished. The tables are printed as they come.

``--device cpu --model tiny`` runs the same path on a CPU in a few minutes (the test of this script).
Exit status: 0 done, 1 a model failed (its traceback is printed; the others still run), 2 a bad argument
(before any model loads).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, uninstalled

# Per model: the rows its goal needs, and warm runs of each. 1.5B: text-to-image (flashu paper 35 against eager
# and Inductor at 50 steps, flashu off against Inductor, the FLOP-predicted gain at 50 steps, CUDA graphs on and
# off); 7B: understanding (flashu paper answer against eager with a KV cache and against Inductor).
# flashu-reference 35 serves no goal and would cost another compile: --only adds it.
T2I = ["eager 50", "inductor 50", "inductor 50 cudagraphs", "flashu off 50", "flashu paper 50", "flashu paper 35",
       "flashu paper 35 cudagraphs"]
MMU = ["eager+kv answer", "inductor answer", "flashu paper answer"]
ROWS = {"showo2-1.5b": (T2I, 3), "showo2-7b": (MMU, 2)}
# Any other model (the CPU path's tiny one): both tasks once, the answer through flashu without passes, since the
# paper preset drops tokens after layer 2 (K = 2) and a model of two layers has none after it: the pass refuses it.
OTHER = (T2I + ["eager+kv answer", "inductor answer", "flashu off answer"], 1)
CUDAGRAPH_ROWS = ("inductor 50 cudagraphs", "flashu paper 35 cudagraphs")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--model", default="showo2-1.5b,showo2-7b", help="comma-separated models (presets or folders)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--runs", type=int, help="warm runs per row (default: 3 for 1.5B, 2 for 7B, 1 otherwise)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="these rows for every model instead of ROWS")
    p.add_argument("--prompts", type=int, default=1, help="prompts per text-to-image request (one image, with CFG)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default="outputs/bench-gpu")
    return p.parse_args(argv)


def bench_argv(args: argparse.Namespace, model: str) -> list[str]:
    """The ``flashu-compile bench`` command line this script runs for ``model``."""
    rows, runs = ROWS.get(model, OTHER)
    rows = args.only or rows
    if args.device != "cuda" and not args.only:
        rows = [r for r in rows if r not in CUDAGRAPH_ROWS]  # CUDA graphs need a GPU
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    argv = ["bench", "--model", model, "--device", args.device, "--dtype", dtype,
            "--runs", str(runs if args.runs is None else args.runs), "--prompts", str(args.prompts),
            "--max-new-tokens", str(args.max_new_tokens), "--shared-caches", "--no-compile-warm",
            "--out", args.out, "--only", *rows]
    return argv + (["--no-progress"] if args.no_progress else [])


def report(done: dict[str, tuple[list, str, str, float]], out: Path) -> str:
    """bench.md, bench.json and bench.png in ``out`` for every model measured so far; returns bench.md's text."""
    from flashu_compile.tools.bench import draw_models, markdown, summary

    sections = [f"## {model}\n\n{markdown(results, machine, command)}\n\nWall-clock of this model's part: "
                f"{seconds:.0f} s." for model, (results, machine, command, seconds) in done.items()]
    text = "\n\n".join(sections) + "\n"
    (out / "bench.md").write_text(text)
    payload = {model: summary(results, machine, command) | {"seconds": seconds}
               for model, (results, machine, command, seconds) in done.items()}
    (out / "bench.json").write_text(json.dumps(payload, indent=2) + "\n")
    try:
        draw_models({model: results for model, (results, *_) in done.items()}, out / "bench.png")
    except ImportError as err:  # the tables are the product; the chart needs matplotlib
        print(f"note: no chart ({err})")
    return text


def warn_old_transformers() -> None:
    """Say so when transformers is older than the project needs (the GPU machine's image has 5.17)."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("5.24"):
        print(f"note: transformers {transformers.__version__} is older than the 5.24 the project needs: a decode step "
              f"with skipped layers (flashu paper answer) is known to fail on 5.17. docs/bench-gpu/README.md says how "
              f"to carry the 5.24 wheel.", flush=True)


def release() -> None:
    """Drop what one model's run left behind (dynamo's compiled code guards its parameters) before the next loads."""
    import gc

    import torch

    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    from flashu_compile.tools.bench import check_args, machine_line, run_bench
    from flashu_compile.tools.cli import USER_ERRORS, build_parser

    args = parse(argv)
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    try:
        if not models:
            raise ValueError(f"--model names no model: {args.model!r}")
        # Every model's arguments are checked before the first one loads.
        runs = [(m, build_parser().parse_args(bench_argv(args, m))) for m in models]
        checked = [(m, bench, *check_args(bench)) for m, bench in runs]
    except SystemExit:  # argparse already printed its usage error
        return 2
    except USER_ERRORS as err:
        print(f"gpu_check: error: {err}", file=sys.stderr)
        return 2
    warn_old_transformers()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done: dict[str, tuple[list, str, str, float]] = {}
    failed = []
    for model, bench, device, dtype in checked:
        t0 = time.perf_counter()
        try:
            results = run_bench(bench, device, dtype)
        except Exception:  # one try on a lent machine: the next model still runs, and the reports keep the others
            traceback.print_exc()
            print(f"gpu_check: {model} failed after {time.perf_counter() - t0:.0f} s", flush=True)
            failed.append(model)
            release()
            continue
        command = shlex.join(["flashu-compile", *bench_argv(args, model)])
        done[model] = (results, machine_line(device, dtype), command, time.perf_counter() - t0)
        print(report(done, out).split(f"## {model}\n\n", 1)[1], flush=True)
        release()
    print(f"-> {out}/bench.md, bench.json, bench.png" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
