"""The ``flashu-compile`` command line."""

from __future__ import annotations

import argparse
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashu-compile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="generate an image and answer a question, printing timings")
    demo.add_argument("--model", default="default",
                      help="'default' (embedded), a preset name (tiny, ...) or a checkpoint folder")
    demo.add_argument("--tokenizer", help="local Qwen2.5 tokenizer folder (real checkpoints)")
    demo.add_argument("--vae", help="local diffusers Wan2.1 VAE folder (real checkpoints)")
    demo.add_argument("--prompt", nargs="+", default=["a red circle left of a blue square"])
    demo.add_argument("--question", default="what colour is the circle?")
    demo.add_argument("--steps", type=int, default=50, help="time-grid points (steps - 1 model calls)")
    demo.add_argument("--guidance", type=float, default=7.5)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--max-new-tokens", type=int, default=16)
    demo.add_argument("--upscale", type=int, default=8, help="nearest-neighbour enlargement of saved images")
    demo.add_argument("--out", default="outputs/demo")
    demo.set_defaults(func=cmd_demo)
    __import__("flashu_compile.calibrate.cli", fromlist=["add_parser"]).add_parser(sub)  # lazy import
    __import__("flashu_compile.tools.graph_diff", fromlist=["add_parser"]).add_parser(sub)
    __import__("flashu_compile.tools.bench", fromlist=["add_parser"]).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)[1:]  # for reports that quote their command
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"flashu-compile {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
