"""The ``flashu-compile`` command line."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch


def _load(args: argparse.Namespace):
    from flashu_compile.models.showo2 import Showo2

    if args.model == "default":
        return Showo2.default()
    if Path(args.model).is_dir():
        return Showo2.from_pretrained(args.model, tokenizer_path=args.tokenizer, vae_path=args.vae)
    return Showo2.from_preset(args.model)


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
    grid.save(path)


def cmd_demo(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = _load(args)
    load_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.model} ({params / 1e6:.2f} M parameters), loaded in {load_s:.2f} s")

    t0 = time.perf_counter()
    images = model.generate_images(args.prompt, steps=args.steps, guidance=args.guidance, seed=args.seed)
    gen_s = time.perf_counter() - t0
    out = Path(args.out)
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
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path} is not a readable image: {err}") from None
    return torch.from_numpy(pixels).permute(2, 0, 1)


def cmd_ask(args: argparse.Namespace) -> int:
    from flashu_compile.options import FlashUOptions
    from flashu_compile.scenes.dataset import make_split, to_tensor
    from flashu_compile.tools.bench import load_plan

    options = {"preset": args.preset, "lowering": args.lowering}
    checked = FlashUOptions.from_dict(options)  # a bad preset or lowering fails before the model loads
    expected = None
    if args.image:
        image, question = _read_image(args.image), args.question or "what colour is the circle?"
    else:
        # A held-out scene of the embedded model's dataset, with one of its questions.
        scene = make_split("test", args.scene + 1, seed=0)[args.scene]
        image = (to_tensor(scene.render()) + 1) / 2
        question, expected = (args.question, None) if args.question else scene.qa[0]
        print(f"image: held-out scene {args.scene}: {scene.caption!r}")
    model = _load(args)
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


def model_args(p: argparse.ArgumentParser) -> None:
    """The options every command that loads a model takes (see :func:`_load`)."""
    p.add_argument("--model", default="default",
                   help="'default' (the embedded scenes model), a preset name (tiny; bench: Show-o2 1.5B's depth and "
                        "729 image tokens at 1/16 width, random weights) or a checkpoint folder")
    p.add_argument("--tokenizer", help="local Qwen2.5 tokenizer folder (real checkpoints)")
    p.add_argument("--vae", help="local diffusers Wan2.1 VAE folder (real checkpoints)")


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
    __import__("flashu_compile.calibrate.cli", fromlist=["add_parser"]).add_parser(sub)  # lazy import
    __import__("flashu_compile.tools.graph_diff", fromlist=["add_parser"]).add_parser(sub)
    __import__("flashu_compile.tools.bench", fromlist=["add_parser"]).add_parser(sub)
    __import__("flashu_compile.tools.bench_ffn", fromlist=["add_parser"]).add_parser(sub)
    __import__("flashu_compile.tools.build_trt", fromlist=["add_parser"]).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # For reports that quote their command: quoted as a shell would need it (names with spaces in --only).
    args.command_line = shlex.join(["flashu-compile", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"flashu-compile {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
