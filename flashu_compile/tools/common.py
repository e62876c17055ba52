"""What the ``flashu-compile`` subcommands share: loading the model a command names, its flags, and checking an
output path before any work.

Every tool imports these from here (never from ``cli``, which imports the tools to register them). Commands call
``common.load_model`` through the module, so a test can stand in for the model load of every command at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..models.showo2 import Showo2
    from ..options import FlashUOptions


def load_model(args: argparse.Namespace) -> Showo2:
    """The model ``--model`` names (see :func:`model_args`), with ``--tokenizer`` and ``--vae``; a model that cannot
    generate and answer (no tokenizer or codec) is refused."""
    from ..models.showo2 import Showo2  # not at import time: the command line starts without transformers
    from ..models.showo2.embedded import EMBEDDED

    if args.model == "default":
        return Showo2.default()
    if args.model in EMBEDDED:
        return Showo2.embedded(args.model)
    if Path(args.model).is_dir():
        model = Showo2.from_pretrained(args.model, tokenizer_path=args.tokenizer, vae_path=args.vae)
    else:
        model = Showo2.from_preset(args.model)
    for part, flag in (("tokenizer", "--tokenizer"), ("codec", "--vae")):
        if getattr(model, part) is None:
            raise ValueError(f"model {args.model!r} has no {part}: give one with {flag}")
    return model


def check_output(flag: str, value: str, *, folder: bool, whole: bool = False) -> Path:
    """An output path that can be written, checked before any work; returns it as a Path.

    ``folder``: the command writes files inside it (created if missing); otherwise it is one file.
    ``whole``: the folder is replaced as a whole (a plan), so it must be named and must not hold
    the working directory, which ``.`` or ``..`` would.
    """
    path = Path(value)
    if whole and (not path.name or path.name in (".", "..") or Path.cwd().resolve().is_relative_to(path.resolve())):
        raise ValueError(f"{flag} {value!r} must name a new or earlier output folder, not one that holds the "
                         "working directory (it is replaced as a whole)")
    if path.exists() and path.is_dir() != folder:
        raise ValueError(f"{flag} {value!r} exists and is {'a file' if folder else 'a folder'}; "
                         f"give {'a folder' if folder else 'a file'} path")
    # Writes happen in the folder itself when it exists and is filled in place, else where it will be created.
    parent = path if folder and not whole and path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {value!r} cannot be created: {str(parent)!r} is a file")
    try:
        # A real write: permission bits say nothing for root, and nothing about read-only file systems.
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise ValueError(f"{flag} {value!r} is not writable: {err.strerror or err} in {str(parent)!r}") from None
    return path


def check_plan(flag: str, value: str | None) -> None:
    """A saved plan's files, read and checked before the model loads (its fit to the model is checked when it is
    loaded for the model): a mistyped folder is reported at once, not after the model loaded or calibrated."""
    if value is None:
        return
    from ..calibrate import Plan

    try:
        Plan.load(value)
    except ValueError as err:
        raise ValueError(f"{flag}: {err}") from None


def flashu_options(options: dict[str, Any]) -> FlashUOptions:
    """``options`` checked as :meth:`FlashUOptions.from_dict` checks them, and their lowering runnable here: a
    missing Torch-TensorRT would otherwise only show once the first graph compiles, after the model loaded."""
    from ..backends.tensorrt import tensorrt_unavailable_reason
    from ..options import FlashUOptions

    opts = FlashUOptions.from_dict(options)
    if opts.lowering == "tensorrt" and (reason := tensorrt_unavailable_reason()) is not None:
        raise ValueError(f"lowering 'tensorrt' cannot be used on this machine: {reason}")
    return opts


# The model the measuring commands (evaluate, bench) load without --model: the one on which every technique of the
# paper preset acts, so that their rows measure what their names say. The others default to the 4-layer model,
# which answers in seconds.
MEASURED_MODEL = "scenes-10"


def model_args(p: argparse.ArgumentParser, default: str = "default") -> None:
    """The options every command that loads a model takes (see :func:`load_model`); ``--model`` is ``default``
    unless given."""
    p.add_argument("--model", default=default,
                   help="'default' (the embedded 4-layer scenes model, also 'scenes'), 'scenes-10' (the embedded "
                        "10-layer scenes model, on which every technique of the paper preset acts), a preset name "
                        "(tiny; bench: Show-o2 1.5B's depth and 729 image tokens at 1/16 width, random weights) or a "
                        f"checkpoint folder (default: {default})")
    p.add_argument("--tokenizer", help="local Qwen2.5 tokenizer folder (real checkpoints)")
    p.add_argument("--vae", help="local diffusers Wan2.1 VAE folder (real checkpoints)")


def parse_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` (a ``-O`` flag) as ``(KEY, value)``: the value read as JSON, else kept as a bare word."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"--option takes KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare word, e.g. step_semantics=project


def cache_artifacts_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-artifacts", metavar="FILE",
                   help="PyTorch's compile caches in one file (torch.compiler's mega-cache): loaded before anything "
                        "compiles when the file exists, written (replaced) after, so a later run, here or on "
                        "another machine of the same kind, compiles nothing it holds")


def load_compile_caches(flag: str, value: str | None) -> Path | None:
    """``value``'s cache artifacts loaded into this process, before anything compiles (a file that is not PyTorch's
    cache artifacts is a ValueError naming ``flag``); returns the path for :func:`save_compile_caches`."""
    if value is None:
        return None
    import torch

    path = check_output(flag, value, folder=False)
    if path.exists():
        # PyTorch logs a file it cannot read, traceback and all, and returns None: the refusal below says it once.
        quiet = logging.getLogger("torch.compiler._cache")
        level, quiet.level = quiet.level, logging.CRITICAL
        try:
            loaded = torch.compiler.load_cache_artifacts(path.read_bytes())
        finally:
            quiet.setLevel(level)
        if loaded is None:
            raise ValueError(f"{flag} {value!r} holds no PyTorch cache artifacts (torch.compiler could not read it)")
        print(f"compile caches loaded from {path}")
    return path


def save_compile_caches(flag: str, path: Path | None) -> None:
    """What this process compiled (and loaded), written to ``path`` atomically, replacing it."""
    if path is None:
        return
    import torch

    from ..files import write_atomic

    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        print(f"{flag}: nothing compiled to a cache (the eager lowering generates no kernels); {path} left as it was")
        return
    write_atomic(path, lambda tmp: tmp.write_bytes(saved[0]))
    print(f"compile caches -> {path}")


def scenes_model(name: str) -> bool:
    """Whether ``--model name`` is one of the embedded models trained on the scenes (their scorers apply)."""
    from ..models.showo2.embedded import EMBEDDED

    return name == "default" or name in EMBEDDED
