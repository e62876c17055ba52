"""``flashu-compile bench``: speed, FLOPs, memory and fidelity of each way of running a model, side by side.

Every configuration serves the same requests (the same prompts and noise for text-to-image, the
same image and question for understanding). Warm runs are interleaved, one run of every
configuration per round, so drift in the machine's speed hits all of them alike.

Per configuration: median and spread (min-max) of warm wall-clock, the time of the first
request (compilation included) with empty Inductor caches and again after ``torch._dynamo.reset()``
with its on-disk caches warm, FLOPs per request counted on the eager lowering of the same
rewritten graphs (:mod:`flashu_compile.runtime.flops`), peak resident memory sampled during its
runs (and on a GPU the peak of ``torch.cuda.max_memory_allocated``, reset per configuration),
graphs compiled and graphs added during warm runs (recompiles), and fidelity to the eager
baseline (relative error of the final latent; token agreement of the answer) plus the scenes
scorers' task scores when the model is the scenes model. On a GPU every timed span ends with
``torch.cuda.synchronize()``, so it measures the device's work, not only its launch.

``--model showo2-1.5b`` / ``showo2-7b`` build Show-o2 at the official dimensions with random
weights, on the device itself (no download): 729 image tokens, the official 290-token text budget
(prompts are padded to it, so the sequence is the official 1024 tokens), the project's scenes
tokenizer standing in for Qwen's (the vocabulary keeps the official size), and random latents of
the Wan2.1 VAE's shape standing in for encoded images.

The package's parts: :mod:`.rows` (configurations, results, the default rows), :mod:`.harness`
(measuring), :mod:`.stats` (speedups and savings), :mod:`.report` (table, JSON, chart),
:mod:`.loading` (machine, device, model and plan) and :mod:`.cli` (the command).
"""

from .cli import add_parser, check_args, cmd_bench, run_bench
from .harness import Bench, PeakRss, inductor_caches, peak_gpu_mb, synchronize, timed_prefill
from .loading import DTYPES, OFFICIAL, check_device, load_model, load_plan, machine_line, random_latents
from .report import draw, draw_models, markdown, plot, summary, write
from .rows import CUDAGRAPH_ROWS, Config, Result, default_configs, select, split_rows
from .stats import off_vs_inductor, speedups, technique_savings

__all__ = ["CUDAGRAPH_ROWS", "DTYPES", "OFFICIAL", "Bench", "Config", "PeakRss", "Result", "add_parser",
           "check_args", "check_device", "cmd_bench", "default_configs", "draw", "draw_models", "inductor_caches",
           "load_model", "load_plan", "machine_line", "markdown", "off_vs_inductor", "peak_gpu_mb", "plot",
           "random_latents", "run_bench", "select", "speedups", "split_rows", "summary", "synchronize",
           "technique_savings", "timed_prefill", "write"]
