"""``flashu-compile build-trt``: build the TensorRT engines of every flashu graph ahead of time.

It compiles the denoising, prefill and decode entry points with ``lowering="tensorrt"``, runs
one text-to-image request and one answer so every graph (and every segment between guards) is
lowered, and leaves the serialised programs in ``OUT/engines``, the engine cache
(:mod:`flashu_compile.backends.trt_cache`), with ``OUT/manifest.json`` naming the entries each
entry point uses. Serve with ``FLASHU_TRT_CACHE=OUT/engines`` and the same model, preset and
plan to load them instead of building.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..backends.tensorrt import engine_settings, tensorrt_unavailable_reason
from ..backends.trt_cache import ENV_VAR, EngineCache, engine_cache
from ..options import PRESETS, FlashUOptions


def _recording(fn: Callable, cache: EngineCache, keys: list[str]) -> Callable:
    """``fn``, noting the cache entries its calls read or write into ``keys``."""

    def run(*args: Any, **kwargs: Any) -> Any:
        start = len(cache.used)
        out = fn(*args, **kwargs)
        keys.extend(k for k in cache.used[start:] if k not in keys)
        return out

    return run


def cmd_build_trt(args) -> int:
    import torch

    from ..models.showo2 import understanding
    from ..models.showo2.sampling import generate_latents
    from .bench import load_plan
    from .cli import _load

    reason = tensorrt_unavailable_reason()
    if reason is not None:  # before loading or calibrating anything
        raise RuntimeError(f"TensorRT engines cannot be built on this machine: {reason}")
    out = Path(args.out)
    engines = out / "engines"
    os.environ[ENV_VAR] = str(engines)  # the lowering reads the cache folder from here
    model = _load(args).to("cuda")
    options: dict[str, Any] = {"preset": args.preset, "lowering": "tensorrt"}
    if "prune_channels" in FlashUOptions.from_dict(options).passes:
        options["plan"] = load_plan(args, model)
    model.compile_tasks("flashu", options)
    cache = engine_cache()
    used: dict[str, list[str]] = {name: [] for name in model.compiled}
    model.compiled = {name: _recording(fn, cache, used[name]) for name, fn in model.compiled.items()}
    with torch.no_grad():
        latents = generate_latents(model, model.tokenizer, [args.prompt], steps=args.steps,
                                   progress=not args.no_progress)
        understanding.answer_tokens(model, model.tokenizer, latents[:1].to(model.dtype), args.question,
                                    max_new_tokens=args.max_new_tokens)
    entries = cache.entries()
    manifest = {
        "model": args.model, "preset": args.preset, "plan": args.plan or "calibrated by build-trt",
        "settings": engine_settings(), "engines": engines.name,
        "entry_points": {name: [{k: entries[key][k] for k in ("key", "file", "graph")} for key in keys]
                         for name, keys in used.items()},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    count = sum(len(keys) for keys in used.values())
    print(f"{count} TensorRT programs in {engines} -> {out / 'manifest.json'}; serve with {ENV_VAR}={engines}")
    return 0


def add_parser(sub) -> None:
    """Register the ``build-trt`` subcommand on the ``flashu-compile`` subparsers ``sub``."""
    from .cli import model_args  # not at import time: cli imports this module

    p = sub.add_parser("build-trt", help="build and serialise the TensorRT engines of the flashu graphs",
                       description=__doc__.split("\n\n")[0])
    model_args(p)
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    p.add_argument("--plan", help="a saved calibration plan (default: calibrate the model first)")
    p.add_argument("--steps", type=int, default=50, help="time-grid points of the text-to-image request")
    p.add_argument("--prompt", default="a red circle left of a blue square")
    p.add_argument("--question", default="what colour is the circle?")
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="folder for engines/ and manifest.json")
    p.set_defaults(func=cmd_build_trt)
