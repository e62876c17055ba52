"""``flashu-compile build-trt``: build the TensorRT engines of every flashu graph ahead of time.

It compiles every entry point ``Showo2.compile_tasks`` compiles with ``lowering="tensorrt"`` and
``trt_cache_dir=OUT/engines``, runs one text-to-image request and one answer so every graph (and
every segment between guards) is lowered, and leaves the engines in Torch-TensorRT's engine cache
under ``OUT/engines``, with ``OUT/manifest.json`` naming the programs each entry point lowered and
the engines built. Serve with ``FLASHU_TRT_CACHE=OUT/engines`` (or the same ``trt_cache_dir``)
and the same model, preset and plan: Torch-TensorRT then loads the engines instead of building them.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from ..backends import tensorrt
from ..backends.trt_cache import ENV_VAR, engine_entries
from ..files import write_atomic
from ..options import PRESETS, TRT_PRECISIONS
from ..tasks import compile_tasks
from ..validate import MAX_STEPS, check_int, check_text
from . import common
from .common import check_output, model_args


def _recording(fn: Callable, keys: list[str]) -> Callable:
    """``fn``, noting into ``keys`` the TensorRT programs its calls lower (compiled, or shared with a twin)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        with tensorrt.lowered_keys() as lowered:
            out = fn(*args, **kwargs)
        keys.extend(k for k in lowered if k not in keys)
        return out

    return run


def cmd_build_trt(args: argparse.Namespace) -> int:
    import torch

    from ..models.showo2 import understanding
    from ..models.showo2.sampling import generate_latents
    from .bench import load_plan

    # Every argument, and whether TensorRT runs here at all, before loading or calibrating anything.
    check_int("--steps", args.steps, 2, MAX_STEPS)
    check_text("--prompt", args.prompt)
    check_text("--question", args.question)
    check_int("--max-new-tokens", args.max_new_tokens, 1)
    out = check_output("--out", args.out, folder=True)
    common.check_plan("--plan", args.plan)
    engines = out / "engines"
    options: dict[str, Any] = {"preset": args.preset, "lowering": "tensorrt", "trt_cache_dir": str(engines),
                               "trt_precision": args.precision}
    checked = common.flashu_options(options)
    model = common.load_model(args).to("cuda")
    if checked.needs_plan:
        options["plan"] = load_plan(args, model)
    compiled = compile_tasks(model, "flashu", options)
    used: dict[str, list[str]] = {name: [] for name in compiled.entries}
    entries = {name: _recording(fn, used[name]) for name, fn in compiled.entries.items()}
    with torch.no_grad():
        latents = generate_latents(model, model.tokenizer, [args.prompt], steps=args.steps,
                                   progress=not args.no_progress, denoise=entries["denoise"], rules=compiled.rules)
        understanding.answer_tokens(model, model.tokenizer, latents[:1].to(model.dtype), args.question,
                                    max_new_tokens=args.max_new_tokens, entries=entries)
    manifest = {
        "model": args.model, "preset": args.preset, "plan": args.plan or "calibrated by build-trt",
        "precision": args.precision, "environment": tensorrt.environment(), "engines": engines.name,
        "engine_entries": sorted(engine_entries(engines)), "entry_points": used,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "manifest.json", lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))
    count = len(manifest["engine_entries"])
    print(f"{count} TensorRT engines in {engines} -> {out / 'manifest.json'}; serve with {ENV_VAR}={engines}")
    return 0


def add_parser(sub) -> None:
    """Register the ``build-trt`` subcommand on the ``flashu-compile`` subparsers ``sub``."""
    p = sub.add_parser("build-trt", help="build and serialise the TensorRT engines of the flashu graphs",
                       description=__doc__.split("\n\n")[0])
    model_args(p)
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    p.add_argument("--plan", help="a saved calibration plan (default: calibrate the model first)")
    p.add_argument("--precision", default="explicit", choices=list(TRT_PRECISIONS),
                   help="explicit: the model's own dtypes; bf16/fp16: Torch-TensorRT's autocast to that type")
    p.add_argument("--steps", type=int, default=50, help="time-grid points of the text-to-image request")
    p.add_argument("--prompt", default="a red circle left of a blue square")
    p.add_argument("--question", default="what colour is the circle?")
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="folder for engines/ and manifest.json")
    p.set_defaults(func=cmd_build_trt)
