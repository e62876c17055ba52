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
from flashu_compile.tools import common
from flashu_compile.tools.common import check_output, model_args
from flashu_compile.validate import MAX_GUIDANCE, MAX_SEED, MAX_STEPS, check_float, check_int, check_text

# What a user's input can cause: bad values (ValueError, with PlanError and CheckpointError), unusable paths
# (OSError), and a transformers config that rejects a value of a checkpoint's sub-config files. Anything else is
# a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, StrictDataclassError)


def _save_grid(images: torch.Tensor, path: Path, upscale: int) -> None:
    from flashu_compile.models.showo2.codecs import to_pil

    pics = to_pil(images, upscale=upscale)
    from PIL import Image

    grid = Image.new("RGB", (sum(p.width for p in pics), max(p.height for p in pics)))
    x = 0
    for p in pics:
        grid.paste(p, (x, 0))
        x += p.width
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: grid.save(tmp, format="PNG"))


def cmd_demo(args: argparse.Namespace) -> int:
    """Generate and answer; ``--out`` is a folder whose ``t2i.png`` is replaced atomically (a file there is refused)."""
    for i, prompt in enumerate(args.prompt):
        check_text(f"--prompt #{i + 1}", prompt)
    check_text("--question", args.question)
    check_int("--steps", args.steps, 2, MAX_STEPS)
    check_float("--guidance", args.guidance, 0.0, MAX_GUIDANCE)
    check_int("--seed", args.seed, 0, MAX_SEED)
    check_int("--upscale", args.upscale, 1, 64)
    out = check_output("--out", args.out, folder=True)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = common.load_model(args)
    load_s = time.perf_counter() - t0
    check_int("--max-new-tokens", args.max_new_tokens, 1, model.config.llm.max_position_embeddings)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.model} ({params / 1e6:.2f} M parameters), loaded in {load_s:.2f} s")

    t0 = time.perf_counter()
    images = model.generate_images(args.prompt, steps=args.steps, guidance=args.guidance, seed=args.seed)
    gen_s = time.perf_counter() - t0
    _save_grid(images, out / "t2i.png", args.upscale)
    calls = args.steps - 1
    print(f"text-to-image: {len(args.prompt)} prompt(s), {args.steps} grid points ({calls} model calls, "
          f"guidance {args.guidance}) in {gen_s:.2f} s ({gen_s / calls * 1000:.1f} ms/call) -> {out / 't2i.png'}")

    image = images[0]
    t0 = time.perf_counter()
    text = model.answer(image, args.question, max_new_tokens=args.max_new_tokens)
    ask_s = time.perf_counter() - t0
    print(f"understanding: Q: {args.question!r} about the first generated image -> A: {text!r} ({ask_s:.2f} s)")
    return 0


def _read_image(path: str) -> torch.Tensor:
    """(3, H, W) in [0, 1] from an image file, with a clear error for anything unreadable."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise FileNotFoundError(f"no image at {path}")
    try:
        # Pillow only warns up to twice its pixel limit; an image that large is no input for a model either.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"{path} is not a readable image: {err}") from None
    return torch.from_numpy(pixels).permute(2, 0, 1)


def cmd_ask(args: argparse.Namespace) -> int:
    from flashu_compile.options import FlashUOptions
    from flashu_compile.scenes.dataset import make_split, to_tensor
    from flashu_compile.tools.bench import load_plan

    options = {"preset": args.preset, "lowering": args.lowering}
    checked = FlashUOptions.from_dict(options)  # a bad preset or lowering fails before the model loads
    check_int("--scene", args.scene, 0)
    if args.question is not None:
        check_text("--question", args.question)  # an empty question is a mistake, not a request for the default
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
    model = common.load_model(args)
    check_int("--max-new-tokens", args.max_new_tokens, 1, model.config.llm.max_position_embeddings)
    if "prune_channels" in checked.passes:
        options["plan"] = load_plan(args, model)
    fast = model.compile_tasks("flashu", options)
    t0 = time.perf_counter()
    text = fast.answer(image, question, max_new_tokens=args.max_new_tokens)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast.answer(image, question, max_new_tokens=args.max_new_tokens)
    warm = time.perf_counter() - t0
    print(f"Q: {question}\nA: {text}" + (f"   (expected: {expected})" if expected is not None else ""))
    print(f"flashu {args.preset} on {args.lowering}: first answer {cold:.2f} s (compilation included), "
          f"then {warm:.3f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashu-compile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="generate an image and answer a question, printing timings")
    model_args(demo)
    demo.add_argument("--prompt", nargs="+", default=["a red circle left of a blue square"])
    demo.add_argument("--question", default="what colour is the circle?")
    demo.add_argument("--steps", type=int, default=50, help="time-grid points (steps - 1 model calls)")
    demo.add_argument("--guidance", type=float, default=7.5)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--max-new-tokens", type=int, default=16)
    demo.add_argument("--upscale", type=int, default=8, help="nearest-neighbour enlargement of saved images")
    demo.add_argument("--out", default="outputs/demo")
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
    ask.set_defaults(func=cmd_ask)
    __import__("flashu_compile.tools.calibrate", fromlist=["add_parser"]).add_parser(sub)  # lazy imports
    __import__("flashu_compile.tools.graph_diff", fromlist=["add_parser"]).add_parser(sub)
    __import__("flashu_compile.tools.bench", fromlist=["add_parser"]).add_parser(sub)
    __import__("flashu_compile.tools.bench_ffn", fromlist=["add_parser"]).add_parser(sub)
    __import__("flashu_compile.tools.build_trt", fromlist=["add_parser"]).add_parser(sub)
    __import__("flashu_compile.tools.evaluate", fromlist=["add_parser"]).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user's mistake is reported as ``error: ...`` with exit status 2, never a traceback."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # argparse's own usage errors (status 2) and --help (status 0), as a return value
        return done.code if isinstance(done.code, int) else 2
    # For reports that quote their command: quoted as a shell would need it (names with spaces in --only).
    args.command_line = shlex.join(["flashu-compile", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"flashu-compile {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
