"""Smoke test of ``lowering="tensorrt"`` on a GPU with torch-tensorrt installed (a few minutes on the embedded model).

    python examples/trt_smoke.py [--model default|PATH] [--steps 4] [--cache DIR]

Checks, each printed as ok/FAIL with its numbers:
1. text-to-image in bf16 without passes and with ``layer_skip`` + ``head_cache``: finite latents, and the
   difference from the eager lowering of the same options;
2. both answer cases (no pass: the decode graph dynamo makes dynamic; ``layer_skip``: decode pieces
   between guards): the same tokens as the eager lowering;
3. the engine cache round trip: after clearing dynamo and the in-process programs, the same request
   adds no engine to the cache (Torch-TensorRT reused every one);
4. one denoising step, Inductor against TensorRT, timed with ``torch.cuda.synchronize``.

Exit status: 0 every check passed, 1 one failed, 2 CUDA or torch-tensorrt is missing (checked first).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from flashu_compile.tasks import compile_tasks

PROMPT = "a red circle left of a blue square"
QUESTION = "what colour is the circle?"


def _latents(model, options: dict[str, Any], steps: int):
    import torch

    from flashu_compile.models.showo2.sampling import generate_latents

    torch._dynamo.reset()
    compiled = compile_tasks(model, "flashu", options)
    with torch.no_grad():
        return generate_latents(model, model.tokenizer, [PROMPT], steps=steps, progress=False,
                                denoise=compiled.entries["denoise"], rules=compiled.rules)


def _answer(model, options: dict[str, Any], image) -> list[int]:
    import torch

    from flashu_compile.models.showo2.understanding import answer_tokens

    torch._dynamo.reset()
    compiled = compile_tasks(model, "flashu", options)
    with torch.no_grad():
        return answer_tokens(model, model.tokenizer, image, QUESTION, max_new_tokens=8, entries=compiled.entries)


def _time(fn: Callable, args: tuple, repeats: int = 20) -> float:
    """Milliseconds per call after warm-up, the GPU drained before and after."""
    import torch

    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="'default' (embedded) or a checkpoint folder")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per image")
    parser.add_argument("--cache", help="engine cache folder (default: a new temporary folder)")
    args = parser.parse_args(argv)

    from flashu_compile.backends.tensorrt import tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    if reason is not None:
        print(f"trt_smoke: error: {reason}", file=sys.stderr)
        return 2

    import torch

    from flashu_compile.backends import tensorrt
    from flashu_compile.backends.trt_cache import engine_entries
    from flashu_compile.models.showo2 import Showo2
    from flashu_compile.models.showo2.sampling import generate_latents

    model = Showo2.default() if args.model == "default" else Showo2.from_pretrained(args.model)
    model = model.to("cuda", torch.bfloat16)
    cache = args.cache or tempfile.mkdtemp(prefix="flashu-trt-")
    trt = {"lowering": "tensorrt", "trt_cache_dir": cache}
    failed = []

    def check(name: str, ok: bool, detail: str) -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
        if not ok:
            failed.append(name)

    for label, passes in (("no passes", []), ("layer_skip + head_cache", ["layer_skip", "head_cache"])):
        want = _latents(model, {"lowering": "eager", "passes": passes}, args.steps)
        got = _latents(model, {**trt, "passes": passes}, args.steps)
        diff = (got.float() - want.float()).abs().max().item()
        check(f"text-to-image, {label}", bool(torch.isfinite(got).all()) and diff < 0.25,
              f"max |TensorRT - eager| = {diff:.4f} (bf16)")
    image = want[:1].to(model.dtype)
    for label, passes in (("no passes (dynamic decode)", []), ("layer_skip", ["layer_skip"])):
        want_tokens = _answer(model, {"lowering": "eager", "passes": passes}, image)
        got_tokens = _answer(model, {**trt, "passes": passes}, image)
        check(f"answer, {label}", got_tokens == want_tokens, f"{got_tokens} vs eager {want_tokens}")

    before = engine_entries(cache)
    tensorrt.PROGRAMS.clear()
    _latents(model, {**trt, "passes": []}, args.steps)
    added = engine_entries(cache) - before
    check("engine cache round trip", bool(before) and not added,
          f"{len(before)} engines cached, {len(added)} built by the second run")

    timings = {}
    for lowering in ("inductor", "tensorrt"):
        torch._dynamo.reset()
        compiled = compile_tasks(model, "flashu", {**trt, "lowering": lowering, "passes": []})
        denoise, calls = compiled.entries["denoise"], []
        with torch.no_grad():
            generate_latents(model, model.tokenizer, [PROMPT], steps=2, progress=False,
                             denoise=lambda *a, fn=denoise, seen=calls: seen.append(a) or fn(*a))
            timings[lowering] = _time(denoise, calls[-1])
    check("one denoising step", True, f"Inductor {timings['inductor']:.2f} ms, TensorRT {timings['tensorrt']:.2f} ms")
    print(f"{len(failed)} of 7 checks failed" if failed else "all 7 checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
