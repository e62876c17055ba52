"""What the bench (and the other tools) run on: the machine line, the device and dtype, the model and its plan."""

from __future__ import annotations

import os
import time

import torch


def machine_line(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> str:
    import platform

    import transformers

    line = (f"{platform.machine()} {platform.processor() or 'CPU'}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"transformers {transformers.__version__}")
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        line += f", {props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    return line + f", {str(dtype).removeprefix('torch.')}"


# Presets at the official dimensions: built with random weights on the bench's device (see the module docstring).
OFFICIAL = ("showo2-1.5b", "showo2-7b")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_device(name: str) -> torch.device:
    """``--device`` as a torch.device, refused when it names a CUDA device this machine does not have."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda: no CUDA device is available (torch {torch.__version__}, "
                         f"CUDA {torch.version.cuda or 'not built in'})")
    return torch.device(name)


def random_latents(model, count: int, seed: int) -> torch.Tensor:
    """``count`` latents of the shape the model's codec gives its images, (count, c, h, w), from ``seed``."""
    c, (h, w) = model.config.image_latent_dim, model.config.latent_size
    return torch.randn(count, c, h, w, generator=torch.Generator().manual_seed(seed))


def load_model(args, device: torch.device, dtype: torch.dtype):
    """The model ``--model`` names, on ``device`` in ``dtype``; an official size with random weights and the
    scenes tokenizer (see the module docstring)."""
    from ...models.showo2 import Showo2
    from ...models.showo2.tokenizer import SceneTokenizer
    from ..common import load_model

    if args.model in OFFICIAL:
        # Initialised where it runs: 7B parameters in fp32 take minutes to fill on a CPU and then to copy over.
        with device:
            model = Showo2.from_preset(args.model, seed=args.seed)
        return model.attach(tokenizer=SceneTokenizer()).to(device=device, dtype=dtype)
    return load_model(args).to(device=device, dtype=dtype)


def load_plan(args, model):
    """The plan saved at ``args.plan``, or one calibrated now on ``model`` (on random latents for understanding
    when the model has no codec to encode images with)."""
    from ...calibrate import Plan, calibrate
    from ...calibrate.scores import DEFAULT_SAMPLES

    if args.plan:
        return Plan.load(args.plan, model)
    images = {}
    if model.codec is None:
        latents = random_latents(model, DEFAULT_SAMPLES, getattr(args, "seed", 0) + 1)
        images = {"images": list(latents[:, None]), "questions": ["what is in the image?"] * DEFAULT_SAMPLES}
    t0 = time.perf_counter()
    plan = calibrate(model, progress=not args.no_progress, **images)
    print(f"calibrated a plan in {time.perf_counter() - t0:.1f} s ({plan.summary()})")
    return plan
