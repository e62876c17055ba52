"""The ``flashu-compile`` command line."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError

from flashu_compile.files import write_atomic
from flashu_compile.graph.rewrite import StrictModeError
from flashu_compile.tasks import compile_tasks
from flashu_compile.tools import common
from flashu_compile.tools.common import check_output, model_args
from flashu_compile.validate import MAX_GUIDANCE, MAX_SEED, MAX_STEPS, check_float, check_int, check_text

# What a user's input can cause: bad values (ValueError, with PlanError and CheckpointError), unusable paths
# (OSError), a transformers config that rejects a value of a checkpoint's sub-config files, and strict=True
# refusing a configuration whose pass does not apply. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, StrictDataclassError, StrictModeError)


def cmd_demo(args: argparse.Namespace) -> int:
    """The same prompts, seed and question through the eager model and through the same model compiled with
    ``backend="flashu"``: timings, the speed-up, FLOPs per image, what the compiler did, and one picture with the
    eager images above the compiled ones (``--out``/t2i.png, replaced atomically; a file at ``--out`` is refused)."""
    from flashu_compile.runtime import FlopTally
    from flashu_compile.runtime.summary import summary
    from flashu_compile.tools.bench import load_plan

    for i, prompt in enumerate(args.prompt):
        check_text(f"--prompt #{i + 1}", prompt)
    check_text("--question", args.question)
    check_int("--steps", args.steps, 2, MAX_STEPS)
    check_float("--guidance", args.guidance, 0.0, MAX_GUIDANCE)
    check_int("--seed", args.seed, 0, MAX_SEED)
    check_int("--upscale", args.upscale, 1, 64)
    check_int("--max-new-tokens", args.max_new_tokens, 1)  # its upper bound is the loaded model's
    options = {"preset": args.preset, "lowering": args.lowering}
    checked = common.flashu_options(options)
    common.check_plan("--plan", args.plan)
    out = check_output("--out", args.out, folder=True)
    caches = common.load_compile_caches("--cache-artifacts", args.cache_artifacts)
    t0 = time.perf_counter()
    model, compiled = common.load_model(args), common.load_model(args)
    check_int("--max-new-tokens", args.max_new_tokens, 1, model.config.llm.max_position_embeddings)
    print(f"model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters), loaded twice "
          f"in {time.perf_counter() - t0:.2f} s")
    if checked.needs_plan:
        options["plan"] = load_plan(args, model)
    compiled.compile(backend="flashu", options=options)
    run = {"prompts": args.prompt, "steps": args.steps, "guidance": args.guidance, "seed": args.seed}

    def timed(fn, *a, **kw):
        t0 = time.perf_counter()
        result = fn(*a, **kw)
        return result, time.perf_counter() - t0

    progress = not args.no_progress
    # One untimed call first: a process's first model call pays one-time costs (thread pools, lazy imports) that
    # would otherwise count against eager alone.
    model.generate_images(args.prompt[:1], steps=2, guidance=args.guidance, seed=args.seed, progress=False)
    eager, eager_s = timed(model.generate_images, **run, progress=progress)
    with FlopTally() as tally:
        tally.record(model.generate_images, **run, progress=False)
    eager_flops = tally.total
    _, first_s = timed(compiled.generate_images, **run, progress=progress)  # compiles its graphs
    fast, fast_s = timed(compiled.generate_images, **run, progress=progress)
    with summary() as done:
        compiled.generate_images(**run, progress=False)
    n = len(args.prompt)
    _save_rows([eager, fast], out / "t2i.png", args.upscale)
    print(f"text-to-image, {n} prompt(s), {args.steps} grid points, guidance {args.guidance:g}, seed {args.seed}:")
    print(f"  eager:             {eager_s / n:.2f} s/image, {eager_flops / n / 1e9:.2f} GFLOP/image")
    print(f"  flashu {args.preset} ({args.lowering}): {fast_s / n:.2f} s/image, {done.flops / n / 1e9:.2f} GFLOP/image "
          f"(first run {first_s:.1f} s, compilation included): {eager_s / fast_s:.2f}x faster")
    print(f"  what the compiler did:\n{_indented(str(done))}")
    print(f"  -> {out / 't2i.png'} (top row eager, bottom row flashu)")
    print(f"understanding: Q: {args.question!r} about the first eager image")
    for name, m in (("eager", model), (f"flashu {args.preset}", compiled)):
        m.answer(eager[0], args.question, max_new_tokens=args.max_new_tokens)  # the compiled one compiles here
        text, seconds = timed(m.answer, eager[0], args.question, max_new_tokens=args.max_new_tokens)
        print(f"  {name}: A: {text!r} ({seconds:.3f} s)")
    common.save_compile_caches("--cache-artifacts", caches)
    return 0


def _indented(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.splitlines())


def _save_rows(rows: list[torch.Tensor], path: Path, upscale: int) -> None:
    """Images (B, 3, H, W) per row, the rows one above the other, as one PNG written atomically."""
    from PIL import Image

    from flashu_compile.models.showo2.codecs import to_pil

    pictures = [to_pil(images, upscale=upscale) for images in rows]
    width = max(sum(p.width for p in row) for row in pictures)
    grid = Image.new("RGB", (width, sum(max(p.height for p in row) for row in pictures)), "white")
    y = 0
    for row in pictures:
        x = 0
        for picture in row:
            grid.paste(picture, (x, y))
            x += picture.width
        y += max(p.height for p in row)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: grid.save(tmp, format="PNG"))


def _read_image(path: str) -> torch.Tensor:
    """(3, H, W) in [0, 1] from an image file, with a clear error for anything unreadable; the pixels are read by
    the model's own rules (:func:`flashu_compile.models.showo2.images.to_pixels`)."""
    from PIL import Image, UnidentifiedImageError

    from flashu_compile.models.showo2.images import to_pixels

    if not Path(path).is_file():
        raise FileNotFoundError(f"no image at {path}")
    try:
        # Pillow only warns up to twice its pixel limit; an image that large is no input for a model either.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return to_pixels(image)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"{path} is not a readable image: {err}") from None


def cmd_ask(args: argparse.Namespace) -> int:
    from flashu_compile.scenes.dataset import make_split, to_tensor
    from flashu_compile.tools.bench import load_plan

    options = {"preset": args.preset, "lowering": args.lowering}
    checked = common.flashu_options(options)  # a bad preset or lowering fails before the model loads
    check_int("--scene", args.scene, 0)
    if args.question is not None:
        check_text("--question", args.question)  # an empty question is a mistake, not a request for the default
    check_int("--max-new-tokens", args.max_new_tokens, 1)  # its upper bound is the loaded model's
    common.check_plan("--plan", args.plan)
    expected = None
    if args.image:
        image = _read_image(args.image)
        question = args.question if args.question is not None else "what colour is the circle?"
    else:
        # A held-out scene of the embedded model's dataset, with one of its questions.
        scene = make_split("test", args.scene + 1, seed=0)[args.scene]
        image = (to_tensor(scene.render()) + 1) / 2
        question, expected = (args.question, None) if args.question is not None else scene.qa[0]
        print(f"image: held-out scene {args.scene}: {scene.caption!r}")
    caches = common.load_compile_caches("--cache-artifacts", args.cache_artifacts)
    model = common.load_model(args)
    check_int("--max-new-tokens", args.max_new_tokens, 1, model.config.llm.max_position_embeddings)
    if checked.needs_plan:
        options["plan"] = load_plan(args, model)
    fast = compile_tasks(model, "flashu", options)
    t0 = time.perf_counter()
    text = fast.answer(image, question, max_new_tokens=args.max_new_tokens)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast.answer(image, question, max_new_tokens=args.max_new_tokens)
    warm = time.perf_counter() - t0
    print(f"Q: {question}\nA: {text}" + (f"   (expected: {expected})" if expected is not None else ""))
    print(f"flashu {args.preset} on {args.lowering}: first answer {cold:.2f} s (compilation included), "
          f"then {warm:.3f} s")
    common.save_compile_caches("--cache-artifacts", caches)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashu-compile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="generate images and answer a question, eager against compiled with flashu")
    model_args(demo)
    demo.add_argument("--prompt", nargs="+", default=["a red circle left of a blue square"])
    demo.add_argument("--question", default="what colour is the circle?")
    demo.add_argument("--steps", type=int, default=50, help="time-grid points (steps - 1 model calls)")
    demo.add_argument("--guidance", type=float, default=1.0, help="s0 (default: the embedded model's best, 1)")
    demo.add_argument("--preset", default="fast", help="flashu preset (default fast: every technique of it acts on "
                                                       "the embedded model)")
    demo.add_argument("--lowering", default="eager",
                      help="eager (default: the rewritten graphs run as they are, so the demo starts in seconds), "
                           "inductor (generated kernels; its first run compiles for a minute or more on 2 cores) "
                           "or tensorrt")
    demo.add_argument("--plan", help="a saved calibration plan (default: calibrate the model first, when needed)")
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--max-new-tokens", type=int, default=16)
    demo.add_argument("--upscale", type=int, default=8, help="nearest-neighbour enlargement of saved images")
    demo.add_argument("--out", default="outputs/demo")
    common.cache_artifacts_arg(demo)
    demo.set_defaults(func=cmd_demo)

    ask = sub.add_parser("ask", help="answer a question about an image with the flashu backend")
    model_args(ask)
    ask.add_argument("--image", help="an image file (default: a held-out scene of the embedded model's dataset)")
    ask.add_argument("--scene", type=int, default=0, help="which held-out scene, without --image")
    ask.add_argument("--question", help="default: the scene's first question (or a colour question with --image)")
    ask.add_argument("--preset", default="paper", help="flashu preset: off, paper or flashu-reference")
    ask.add_argument("--lowering", default="inductor", help="inductor, eager or tensorrt")
    ask.add_argument("--plan", help="a saved calibration plan (default: calibrate the model first)")
    ask.add_argument("--max-new-tokens", type=int, default=32)
    ask.add_argument("--no-progress", action="store_true")
    common.cache_artifacts_arg(ask)
    ask.set_defaults(func=cmd_ask)
    __import__("flashu_compile.tools.calibrate", fromlist=["add_parser"]).add_parser(sub)  # lazy imports
    __import__("flashu_compile.tools.graph_diff", fromlist=["add_parser"]).add_parser(sub)
    __import__("flashu_compile.tools.bench", fromlist=["add_parser"]).add_parser(sub)
    __import__("flashu_compile.tools.bench_ffn", fromlist=["add_parser"]).add_parser(sub)
    __import__("flashu_compile.tools.build_trt", fromlist=["add_parser"]).add_parser(sub)
    __import__("flashu_compile.tools.evaluate", fromlist=["add_parser"]).add_parser(sub)
    return parser


def _reported(err: Exception) -> Exception | None:
    """The error to show for ``err`` when the user's input caused it, else None (a bug keeps its traceback).

    torch.compile wraps what a backend raises in dynamo's BackendCompilerFailed. The flashu backend lets its own
    errors through by their types, but not others it meets while compiling (an OSError of a folder it writes), so
    the wrapped error is judged, and shown, as the backend raised it.
    """
    from torch._dynamo.exc import BackendCompilerFailed

    while isinstance(err, BackendCompilerFailed):
        err = err.inner_exception
    return err if isinstance(err, USER_ERRORS) else None


def _message(err: Exception) -> str:
    """``err``'s own message: an error that left a compiled frame also carries what dynamo appends after a blank
    line (where in the user's code, how to see dynamo's stack), advice for a compiler bug, not a user's mistake."""
    text = str(err)
    if hasattr(err, "innermost_user_frame_summary"):  # set by dynamo where it appends to the message
        text = text.split("\n\n", 1)[0].rstrip("\n")
    return text


def _run(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # argparse's own usage errors (status 2) and --help (status 0), as a return value
        return done.code if isinstance(done.code, int) else 2
    # For reports that quote their command: quoted as a shell would need it (names with spaces in --only).
    args.command_line = shlex.join(["flashu-compile", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except Exception as err:
        reported = _reported(err)
        if reported is None:
            raise
        print(f"flashu-compile {args.command}: error: {_message(reported)}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user's mistake is reported as ``error: ...`` with exit status 2, never a traceback, and
    Ctrl-C as ``interrupted`` with the shell's status for SIGINT, 130 (every report is written atomically, so an
    interrupted command leaves none half-written)."""
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
