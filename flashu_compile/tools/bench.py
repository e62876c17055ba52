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
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..models.showo2 import understanding
from ..models.showo2.sampling import generate_latents
from ..runtime.flops import FlopTally, counted


@dataclass
class Config:
    name: str
    task: str  # "t2i" or "mmu"
    backend: str  # "eager", "inductor" or "flashu"
    steps: int = 50
    options: dict | None = None


@dataclass
class Result:
    name: str
    task: str
    runs_s: list[float] = field(default_factory=list)
    prefill_s: list[float] = field(default_factory=list)  # mmu: the prefill's share of each warm run
    compile_cold_s: float = 0.0  # first request, compilation included, Inductor caches empty
    compile_warm_s: float | None = None  # the same after torch._dynamo.reset(), on-disk caches warm
    flops: int = 0
    peak_rss_mb: float = 0.0
    graphs: int = 0
    recompiles: int = 0
    fidelity: float | None = None  # t2i: relative error of the final latent; mmu: token agreement
    scores: dict = field(default_factory=dict)
    peak_gpu_mb: float | None = None  # torch.cuda.max_memory_allocated over its runs; None off the GPU
    tokens: int | None = None  # mmu: tokens in the answer (it stops at eos), which its time depends on

    @property
    def median_s(self) -> float:
        return statistics.median(self.runs_s)


# The per-technique rows (``--split``): what each generation technique saves on its own, at the
# paper preset's settings. The pass rows drop the guidance schedule so that each row changes one thing.
SPLIT = {"flashu prune 50": "prune_channels", "flashu skip 50": "layer_skip", "flashu cache 50": "head_cache",
         "flashu prefix 50": "prefix_cache (exact; not in the paper preset)",
         "flashu guidance 50": "guidance schedule", "flashu paper 50": "all of the paper preset"}


# The rows that replay CUDA graphs; without a GPU they are left out of the default rows (--only still
# picks them: Inductor then compiles without CUDA graphs, and the flashu lowering says so in a warning).
CUDAGRAPH_ROWS = ("inductor 50 cudagraphs", "flashu paper 35 cudagraphs")


def default_configs(plan, split: bool = False, cudagraphs: bool = False) -> list[Config]:
    """The default comparison, plus the per-technique rows when ``split`` and the CUDA-graph rows when
    ``cudagraphs``."""
    paper = {"preset": "paper", "plan": plan}
    configs = [
        Config("eager 50", "t2i", "eager"),
        Config("inductor 50", "t2i", "inductor"),
        # Inductor's mode="reduce-overhead": the whole denoising step replays as CUDA graphs.
        Config("inductor 50 cudagraphs", "t2i", "inductor", 50, {"triton.cudagraphs": True}),
        # No pass enabled: must run as fast as Inductor (issue #3's 5% bound).
        Config("flashu off 50", "t2i", "flashu", 50, {"preset": "off"}),
        Config("flashu paper 50", "t2i", "flashu", 50, paper),
        Config("flashu paper 35", "t2i", "flashu", 35, paper),
        # Each compiled piece between the guards replays as CUDA graphs.
        Config("flashu paper 35 cudagraphs", "t2i", "flashu", 35, paper | {"cudagraphs": True}),
        Config("flashu-reference 35", "t2i", "flashu", 35, {"preset": "flashu-reference", "plan": plan}),
        Config("eager+kv answer", "mmu", "eager"),
        Config("inductor answer", "mmu", "inductor"),
        Config("flashu off answer", "mmu", "flashu", options={"preset": "off"}),
        Config("flashu paper answer", "mmu", "flashu", options=paper),
    ]
    if split:
        one = {"prune": "prune_channels", "skip": "layer_skip", "cache": "head_cache", "prefix": "prefix_cache"}
        configs += [Config(f"flashu {short} 50", "t2i", "flashu", 50,
                           paper | {"passes": [name], "guidance_schedule": None}) for short, name in one.items()]
        # No pass: the graphs are lowered as by preset "off"; only the sampler's guidance scales change.
        configs.append(Config("flashu guidance 50", "t2i", "flashu", 50, paper | {"passes": []}))
    return configs if cudagraphs else [c for c in configs if c.name not in CUDAGRAPH_ROWS]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it includes that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def timed_prefill(model, seconds: list[float]) -> Iterator[None]:
    """Append the wall-clock of each prefill the model's answer path makes inside the block."""
    run = model.compiled.get("prefill", understanding.prefill)

    def prefill(*args):
        synchronize(model.device)
        t0 = time.perf_counter()
        out = run(*args)
        synchronize(model.device)
        seconds.append(time.perf_counter() - t0)
        return out

    model.compiled["prefill"] = prefill
    try:
        yield
    finally:
        model.compiled["prefill"] = run


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


class PeakRss:
    """Highest resident set size seen while active, sampled every 5 ms by a thread."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_mb())

    def __enter__(self) -> PeakRss:
        self.peak = _rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


@contextlib.contextmanager
def peak_gpu_mb(device: torch.device, result: Result) -> Iterator[None]:
    """Raise ``result.peak_gpu_mb`` to the most GPU memory allocated inside the block (nothing off the GPU)."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.reset_peak_memory_stats(device)
    try:
        yield
    finally:
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        result.peak_gpu_mb = max(result.peak_gpu_mb or 0.0, peak)


@contextlib.contextmanager
def inductor_caches(path: Path) -> Iterator[None]:
    """Inductor (and Triton) caches on disk in ``path``, the in-process ones emptied first, as in a
    new process; the previous cache folders are restored on exit."""
    from torch._inductor.utils import clear_caches

    saved = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    os.environ["TORCHINDUCTOR_CACHE_DIR"], os.environ["TRITON_CACHE_DIR"] = str(path), str(path / "triton")
    clear_caches()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Bench:
    """Holds the model and, per configuration, its compiled entry points."""

    def __init__(self, model, configs: list[Config], prompts: list[str], image: torch.Tensor, question: str,
                 max_new_tokens: int = 32, seed: int = 0, scenes: list | None = None,
                 expected_answer: str | None = None, guidance: float = 7.5) -> None:
        """``image`` is a latent (1, c, h, w); ``scenes`` (one per prompt) and ``expected_answer``
        switch on the scenes scorers. ``guidance`` is s0 of every text-to-image row: its constant scale,
        or the base a preset's relative guidance schedule scales."""
        if guidance < 0:  # the sampler would say so too, but only after every configuration has compiled
            raise ValueError(f"guidance must be >= 0, got {guidance}")
        self.guidance = guidance
        self.model, self.configs = model, configs
        self.prompts, self.image, self.question = prompts, image, question
        self.scenes, self.expected_answer = scenes, expected_answer
        self.max_new_tokens = max_new_tokens
        c, (h, w) = model.config.image_latent_dim, model.config.latent_size
        self.noise = torch.randn(len(prompts), c, h, w, generator=torch.Generator().manual_seed(seed))
        self.programs: dict[str, tuple[dict, object]] = {}

    def _use(self, config: Config, lowering: str | None = None) -> None:
        """Install ``config``'s compiled entry points on the model (compiling them on first use)."""
        key = config.name + (f"/{lowering}" if lowering else "")
        if key not in self.programs:
            model = self.model
            if config.backend == "eager":
                # Wrapped so a FlopTally counts exactly the model calls, as it does for compiled programs.
                compiled = {"embed": counted(model.embed), "denoise": counted(model.denoise),
                            "prefill": counted(understanding.prefill), "decode": counted(understanding.decode_step)}
                self.programs[key] = (compiled, None)
            else:
                options = dict(config.options or {})
                if lowering:
                    # CUDA graphs belong to Inductor; the same graphs on another lowering run without them.
                    options = {k: v for k, v in options.items() if k != "cudagraphs"} | {"lowering": lowering}
                model.compile_tasks(config.backend, options or None)
                self.programs[key] = (model.compiled, model.flashu_options)
        self.model.compiled, self.model.flashu_options = self.programs[key]

    @torch.no_grad()
    def request(self, config: Config):
        if config.task == "t2i":
            return generate_latents(self.model, self.model.tokenizer, self.prompts, steps=config.steps,
                                    guidance=self.guidance, noise=self.noise, progress=False)
        return understanding.answer_tokens(self.model, self.model.tokenizer, self.image, self.question,
                                           max_new_tokens=self.max_new_tokens)

    def run(self, runs: int = 5, progress: bool = True, compile_warm: bool = True,
            fresh_caches: bool = True) -> list[Result]:
        """Measure every configuration; ``compile_warm=False`` leaves out the second first request (after a
        dynamo reset, on warm caches), which compiles every configuration again. ``fresh_caches=False``
        gives all configurations one set of Inductor caches: a graph an earlier configuration compiled is
        then loaded, not compiled (less time in all; compile cold is then "with the earlier rows' caches")."""
        with tempfile.TemporaryDirectory(prefix="flashu-bench-") as caches:
            folders = [Path(caches) / (str(i) if fresh_caches else "shared") for i in range(len(self.configs))]
            return self._run(runs, progress, folders, compile_warm)

    def _run(self, runs: int, progress: bool, caches: list[Path], compile_warm: bool) -> list[Result]:
        results = {c.name: Result(c.name, c.task) for c in self.configs}
        outputs = {}
        device = self.model.device
        bar = tqdm(total=len(self.configs) * (runs + 2 + compile_warm), desc="bench", disable=not progress)
        for i, config in enumerate(self.configs):  # cold: first request, compile included, empty caches
            r = results[config.name]
            before = _graphs()
            with PeakRss() as rss, peak_gpu_mb(device, r), inductor_caches(caches[i]):
                synchronize(device)
                t0 = time.perf_counter()
                self._use(config)
                outputs[config.name] = self.request(config)
                synchronize(device)
                r.compile_cold_s = time.perf_counter() - t0
            if config.task == "mmu":
                r.tokens = len(outputs[config.name])
            r.graphs, r.peak_rss_mb = _graphs() - before, rss.peak
            bar.update()
        for _ in range(runs):  # warm, interleaved
            for config in self.configs:
                r = results[config.name]
                self._use(config)
                before = _graphs()
                with PeakRss() as rss, peak_gpu_mb(device, r), timed_prefill(self.model, r.prefill_s):
                    synchronize(device)
                    t0 = time.perf_counter()
                    self.request(config)
                    synchronize(device)
                    r.runs_s.append(time.perf_counter() - t0)
                r.recompiles += _graphs() - before
                r.peak_rss_mb = max(r.peak_rss_mb, rss.peak)
                bar.update()
        for config in self.configs:  # FLOPs on the eager lowering of the same graphs
            if config.backend == "flashu":
                self._use(config, lowering="eager")
            else:  # eager and Inductor run the unrewritten graph
                self._use(Config("eager", config.task, "eager"))
            with FlopTally() as tally:
                self.request(config)
            results[config.name].flops = tally.total
            bar.update()
        if compile_warm:
            self._compile_warm(results, caches, bar)
        bar.close()
        self._fidelity(results, outputs)
        self.model.compiled, self.model.flashu_options = {}, None
        return list(results.values())

    def _compile_warm(self, results: dict[str, Result], caches: list[Path], bar: tqdm) -> None:
        """First request again, after a dynamo reset, on the on-disk caches the cold request filled.

        Last, because the reset drops every configuration's compiled code. A configuration that
        compiled nothing cold (it reused another's programs, or runs eagerly) is left out.
        """
        for i, config in enumerate(self.configs):
            r = results[config.name]
            if r.graphs:
                torch._dynamo.reset()
                self.programs.pop(config.name)
                with inductor_caches(caches[i]):
                    t0 = time.perf_counter()
                    self._use(config)
                    self.request(config)
                    synchronize(self.model.device)
                    r.compile_warm_s = time.perf_counter() - t0
            bar.update()

    def _fidelity(self, results: dict[str, Result], outputs: dict) -> None:
        baselines = {c.task: c.name for c in reversed(self.configs) if c.backend == "eager"}
        for config in self.configs:
            out, base = outputs[config.name], outputs.get(baselines.get(config.task))
            r = results[config.name]
            if base is None:
                continue
            if config.task == "t2i":
                r.fidelity = float((out - base).norm() / base.norm().clamp_min(1e-12))
            else:
                n = max(len(out), len(base), 1)
                r.fidelity = sum(a == b for a, b in zip(out, base, strict=False)) / n
            r.scores = self.score(config, out)

    def score(self, config: Config, out) -> dict:
        """Scenes scorers on this configuration's output, when prompts/question come from scenes."""
        from ..scenes.scoring import geneval_score, normalise_answer

        if config.task == "t2i":
            if not self.scenes or self.model.codec is None:
                return {}
            summary = geneval_score(self.model.codec.decode(out), self.scenes)
            return {"geneval": summary["correct"], "colour": summary["colour"]}
        if self.expected_answer is None:
            return {}
        answer = self.model.tokenizer.decode(out)
        return {"answer": answer, "correct": normalise_answer(answer) == normalise_answer(self.expected_answer)}


def _baselines(results: list[Result]) -> dict[tuple[str, str], Result]:
    """The first eager and the first Inductor result of each task, by (task, "eager" | "inductor")."""
    base = {}
    for r in results:
        kind = "eager" if r.name.startswith("eager") else "inductor" if r.name.startswith("inductor") else None
        if kind:
            base.setdefault((r.task, kind), r)
    return base


def speedups(results: list[Result]) -> dict[str, dict[str, float]]:
    """Per result: measured and FLOP-predicted speedup over its task's eager and Inductor baselines."""
    base = _baselines(results)
    out = {}
    for r in results:
        row = {}
        for kind in ("eager", "inductor"):
            b = base.get((r.task, kind))
            if b is not None:
                row[f"vs_{kind}"] = b.median_s / r.median_s
                row[f"flop_ratio_vs_{kind}"] = b.flops / r.flops if r.flops else float("nan")
        out[r.name] = row
    return out


def off_vs_inductor(results: list[Result]) -> dict[str, float]:
    """Warm median of each ``flashu off`` row over its task's Inductor baseline (issue #3: at most 1.05)."""
    base = _baselines(results)
    return {r.name: r.median_s / base[(r.task, "inductor")].median_s for r in results
            if r.name.startswith("flashu off") and (r.task, "inductor") in base}


def technique_savings(results: list[Result]) -> dict[str, dict]:
    """Per-technique row (``SPLIT``): its technique and the share of the Inductor baseline's FLOPs it removes."""
    base = _baselines(results).get(("t2i", "inductor"))
    if base is None or not base.flops:
        return {}
    return {r.name: {"technique": SPLIT[r.name], "baseline": base.name, "flops_saved": 1 - r.flops / base.flops}
            for r in results if r.name in SPLIT}


def _num(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.2f}"


def _fidelity(r: Result) -> str:
    if r.fidelity is None:
        return "-"
    return f"rel. err {r.fidelity:.3g}" if r.task == "t2i" else f"tokens {r.fidelity:.0%}"


def markdown(results: list[Result], machine: str, command: str) -> str:
    ups = speedups(results)
    gpu = any(r.peak_gpu_mb is not None for r in results)  # the column is there only for runs on a GPU
    lines = [f"Machine: {machine}. Command: `{command}`.", "",
             "| configuration | warm median (s) | spread (s) | × eager | × inductor | FLOPs (G) | FLOP-predicted × "
             "inductor | reached | compile cold (s) | compile warm (s) | peak RSS (MB) | "
             + ("peak GPU (MB) | " if gpu else "") + "graphs | recompiles | fidelity | task score |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
             + ("---: | " if gpu else "") + "---: | ---: | --- | --- |"]
    for r in results:
        u = ups[r.name]
        ideal = u.get("flop_ratio_vs_inductor", float("nan"))
        reached = (u["vs_inductor"] - 1) / (ideal - 1) if ideal and ideal > 1.001 else float("nan")
        score = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.scores.items()) or "-"
        warm = "-" if r.compile_warm_s is None else f"{r.compile_warm_s:.1f}"
        lines.append(
            f"| {r.name} | {r.median_s:.3f} | {min(r.runs_s):.3f}-{max(r.runs_s):.3f} | {_num(u.get('vs_eager'))} | "
            f"{_num(u.get('vs_inductor'))} | {r.flops / 1e9:.2f} | {_num(ideal)} | "
            f"{'-' if reached != reached else f'{reached:.0%}'} | {r.compile_cold_s:.1f} | {warm} | "
            f"{r.peak_rss_mb:.0f} | " + (f"{r.peak_gpu_mb or 0:.0f} | " if gpu else "")
            + f"{r.graphs} | {r.recompiles} | {_fidelity(r)} | {score} |")
    lines += ["", "`reached`: the share of the FLOP-predicted gain over Inductor that the measured time realises, "
              "(measured − 1) / (predicted − 1). `compile cold`: the first request, compilation included, with "
              "empty Inductor caches (the first compiled configuration also pays Inductor's one-time imports); "
              "`compile warm`: the first request again after `torch._dynamo.reset()`, with the on-disk caches the "
              "cold request filled, as a restarted process would see it; `-` where nothing was compiled."]
    answers = [r for r in results if r.prefill_s]
    if answers:
        lines += ["", "Prefill (image + question into the KV cache) within each answer, warm median: " + "; ".join(
            f"{r.name} {statistics.median(r.prefill_s):.4f} s" for r in answers) + ". Tokens per answer: " + "; ".join(
            f"{r.name} {r.tokens}" for r in answers) + "."]
    off = off_vs_inductor(results)
    if off:
        base = _baselines(results)
        ratios = "; ".join(f"{r.name} / {base[(r.task, 'inductor')].name}: {off[r.name]:.3f} "
                           f"({'within' if off[r.name] <= 1.05 else 'over'} 5%)" for r in results if r.name in off)
        lines += ["", f"No pass enabled, warm median over Inductor's (goal at most 1.05): {ratios}."]
    saved = technique_savings(results)
    if saved:
        by_name = {r.name: r for r in results}
        baseline = next(iter(saved.values()))["baseline"]
        lines += ["", f"Savings by technique, each at the paper preset's settings on its own, against {baseline}:", "",
                  f"| technique | configuration | FLOPs (G) | FLOPs saved vs {baseline} | × inductor | fidelity |",
                  "| --- | --- | ---: | ---: | ---: | --- |"]
        for name, row in saved.items():
            r = by_name[name]
            lines.append(f"| {row['technique']} | {name} | {r.flops / 1e9:.2f} | {row['flops_saved']:.1%} | "
                         f"{_num(ups[name].get('vs_inductor'))} | {_fidelity(r)} |")
    return "\n".join(lines)


def draw(results: list[Result], path: Path) -> None:
    draw_models({"": results}, path)


def draw_models(results: dict[str, list[Result]], path: Path) -> None:
    """One row of charts (text-to-image, answer) per model, titled with its name where it has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(len(results), 2, figsize=(12, 4.5 * len(results)), squeeze=False)
    for axes, (model, rows) in zip(grid, results.items(), strict=True):
        plot(axes, rows, f"{model}: " if model else "")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(axes, results: list[Result], prefix: str = "") -> None:
    """The text-to-image and the answer rows of ``results`` on a pair of matplotlib axes."""
    for ax, task, title in ((axes[0], "t2i", "text-to-image request"), (axes[1], "mmu", "answer request")):
        rows = [r for r in results if r.task == task]
        if not rows:
            ax.set_visible(False)
            continue
        names = [r.name for r in rows]
        med = [r.median_s for r in rows]
        err = [[m - min(r.runs_s) for m, r in zip(med, rows, strict=True)],
               [max(r.runs_s) - m for m, r in zip(med, rows, strict=True)]]
        ax.barh(names, med, xerr=err, color="#4c78a8")
        ax.invert_yaxis()
        ax.set_xlabel("warm wall-clock, median and min-max (s)")
        ax.set_title(prefix + title)
        for y, r in enumerate(rows):
            ax.text(r.median_s, y, f" {r.flops / 1e9:.1f} GFLOP", va="center", fontsize=8)


def summary(results: list[Result], machine: str, command: str) -> dict:
    """What bench.json holds for one model's results."""
    return {"machine": machine, "command": command, "speedups": speedups(results),
            "flashu_off_vs_inductor": off_vs_inductor(results), "savings_by_technique": technique_savings(results),
            "results": [asdict(r) | {"median_s": r.median_s} for r in results]}


def write(results: list[Result], out: Path, machine: str, command: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(results, machine, command)
    (out / "bench.md").write_text(table + "\n")
    (out / "bench.json").write_text(json.dumps(summary(results, machine, command), indent=2) + "\n")
    try:
        draw(results, out / "bench.png")
    except ImportError as err:  # the table and JSON are the product; the chart needs matplotlib
        print(f"note: no chart ({err})")
    return table


def select(configs: list[Config], only: list[str] | None) -> list[Config]:
    if not only:
        return configs
    names = [c.name for c in configs]
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ValueError(f"unknown bench configuration(s) {unknown}; choose from {names}")
    return [c for c in configs if c.name in only]


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
    from ..models.showo2 import Showo2
    from ..models.showo2.tokenizer import SceneTokenizer
    from .cli import _load

    if args.model in OFFICIAL:
        # Initialised where it runs: 7B parameters in fp32 take minutes to fill on a CPU and then to copy over.
        with device:
            model = Showo2.from_preset(args.model, seed=args.seed)
        return model.attach(tokenizer=SceneTokenizer()).to(device=device, dtype=dtype)
    return _load(args).to(device=device, dtype=dtype)


def load_plan(args, model):
    """The plan saved at ``args.plan``, or one calibrated now on ``model`` (on random latents for understanding
    when the model has no codec to encode images with)."""
    from ..calibrate import Plan, calibrate
    from ..calibrate.scores import DEFAULT_SAMPLES

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


def check_args(args) -> tuple[torch.device, torch.dtype]:
    """Every argument of ``bench`` checked before any work; returns the device and dtype."""
    from ..validate import MAX_GUIDANCE, MAX_SEED, check_float, check_int
    from .cli import check_output

    check_int("--runs", args.runs, 1)
    check_int("--prompts", args.prompts, 1)
    check_int("--max-new-tokens", args.max_new_tokens, 1)
    check_float("--guidance", args.guidance, 0.0, MAX_GUIDANCE)
    check_int("--seed", args.seed, 0, MAX_SEED)
    check_output("--out", args.out, folder=True)
    if args.dtype not in DTYPES:  # argparse's choices say so on the command line; this guards direct callers
        raise ValueError(f"--dtype must be one of {list(DTYPES)}, got {args.dtype!r}")
    if args.only:
        select(default_configs(None, split=True, cudagraphs=True), args.only)  # a typo fails before the model loads
    return check_device(args.device), DTYPES[args.dtype]


def run_bench(args, device: torch.device, dtype: torch.dtype) -> list[Result]:
    """Load the model, calibrate (or load) its plan and measure the configurations ``args`` select."""
    from ..scenes.dataset import make_split, to_tensor

    # Up to sixteen configurations compile the same entry points with different backends and options.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    model = load_model(args, device, dtype)
    print(f"model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"{device.type}, {str(dtype).removeprefix('torch.')})")
    plan = load_plan(args, model)
    scenes = make_split("test", args.prompts + 1, seed=args.seed)
    prompts, (question, expected) = [s.caption for s in scenes[:-1]], scenes[-1].qa[0]
    if model.codec is None:
        image = random_latents(model, 1, args.seed)
    else:
        image = model.encode_image((to_tensor(scenes[-1].render()) + 1) / 2)
    # --only picks from every row, --split and the CUDA-graph rows included; without --only, --split adds the
    # per-technique rows, and a GPU the CUDA-graph rows.
    configs = select(default_configs(plan, split=args.split or bool(args.only),
                                     cudagraphs=device.type == "cuda" or bool(args.only)), args.only)
    # The scenes scorers mean something only for the model trained on the scenes.
    scored = args.model == "default"
    bench = Bench(model, configs, prompts, image, question, max_new_tokens=args.max_new_tokens, seed=args.seed,
                  scenes=scenes[:-1] if scored else None, expected_answer=expected if scored else None,
                  guidance=args.guidance)
    return bench.run(args.runs, progress=not args.no_progress, compile_warm=not args.no_compile_warm,
                     fresh_caches=not args.shared_caches)


def cmd_bench(args) -> int:
    device, dtype = check_args(args)
    results = run_bench(args, device, dtype)
    print(write(results, Path(args.out), machine_line(device, dtype), args.command_line))
    print(f"-> {args.out}/bench.md, bench.json, bench.png")
    return 0


def add_parser(sub) -> None:
    """Register the ``bench`` subcommand on the ``flashu-compile`` subparsers ``sub``."""
    from .cli import model_args  # not at import time: cli imports this module

    p = sub.add_parser("bench", help="speed, FLOPs, memory and fidelity of eager, Inductor and flashu side by side",
                       description=__doc__.split("\n\n")[0])
    model_args(p)
    p.add_argument("--plan", help="a saved calibration plan (default: calibrate the model first)")
    p.add_argument("--runs", type=int, default=5, help="warm runs per configuration (at least 1)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per text-to-image request (test scenes)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--guidance", type=float, default=7.5,
                   help="guidance s0 of the text-to-image rows, which a preset's schedule scales (default: the "
                        "official 7.5; the embedded model draws best at 1, which still runs both rows of CFG)")
    p.add_argument("--split", action="store_true",
                   help="add one row per generation technique (prune, skip, cache, prefix, guidance at 50 steps) "
                        "and the FLOPs each saves")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="run only these configurations (by name, from the default, --split and CUDA-graph rows)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the model runs (cuda: timings synchronise the device, peak GPU memory is reported)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="the model's parameter dtype")
    p.add_argument("--no-compile-warm", action="store_true",
                   help="leave out the second first request (after a dynamo reset, on warm caches), which compiles "
                        "every configuration again")
    p.add_argument("--shared-caches", action="store_true",
                   help="one set of Inductor caches for all configurations (faster; compile cold then counts what "
                        "earlier rows compiled as cached)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default="outputs/bench")
    p.set_defaults(func=cmd_bench)
