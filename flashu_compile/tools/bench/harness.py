"""The measuring harness: every configuration serves the same requests, warm runs interleaved.

Per configuration it times the first request cold (empty Inductor caches) and warm (after
``torch._dynamo.reset()``, on-disk caches full), the warm runs, FLOPs on the eager lowering of the
same graphs, peak memory, graphs compiled and recompiles, and fidelity to the eager baseline.
"""

from __future__ import annotations

import contextlib
import gc
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from ...backend import sampler_rules
from ...backends.inductor import forget_compiled_pieces
from ...models.showo2 import understanding
from ...models.showo2.sampling import generate_latents
from ...passes.manager import pass_outcomes
from ...runtime.compile_profile import profiling
from ...runtime.flops import FlopTally, counted
from ...runtime.summary import summary
from ...tasks import compile_tasks
from .rows import Config, Result


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it includes that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def timed_prefill(entries: dict, device: torch.device, seconds: list[float]) -> Iterator[None]:
    """Append the wall-clock of each prefill the answer path through ``entries`` makes inside the block."""
    run = entries["prefill"]

    def prefill(*args):
        synchronize(device)
        t0 = time.perf_counter()
        out = run(*args)
        synchronize(device)
        seconds.append(time.perf_counter() - t0)
        return out

    entries["prefill"] = prefill
    try:
        yield
    finally:
        entries["prefill"] = run


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


def _start_as_a_new_process() -> None:
    """Forget, as a fresh process starts, what one row's compile left in memory for the next; keep the compiled code.

    Rows compile the same functions (the answer's prefill and decode step are one code object for every
    backend), and dynamo keeps per code object the sizes it saw: an earlier row whose KV caches had other
    lengths (no token drop) made a later row's first trace symbolic in them, a graph that row's warm start,
    after a full reset, traced static and so never found in the caches it had filled. And the Inductor
    lowering shares a compiled piece with every later piece of its structure while a program holds it: a
    row would reuse pieces an earlier row compiled, as a new process cannot. And what the reset dropped is
    collected now: a new process holds no garbage, where here the compiled programs just dropped (cycles of FX
    nodes) would wait for a collection, a full one of every object the process holds, that falls inside whichever
    row's time comes next.
    """
    forget_compiled_pieces()
    gc.collect()
    try:
        from torch._dynamo.pgo import reset_code_state
    except ImportError:  # a release without per-code size state has nothing to forget
        return
    reset_code_state()


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
                 expected_answer: str | None = None, guidance: float = 7.5, profile_compile: bool = False) -> None:
        """``image`` is a latent (1, c, h, w); ``scenes`` (one per prompt) and ``expected_answer``
        switch on the scenes scorers. ``guidance`` is s0 of every text-to-image row: its constant scale,
        or the base a preset's relative guidance schedule scales. ``profile_compile`` times the phases of each
        first request (:mod:`flashu_compile.runtime.compile_profile`)."""
        if guidance < 0:  # the sampler would say so too, but only after every configuration has compiled
            raise ValueError(f"guidance must be >= 0, got {guidance}")
        self.guidance, self.profile_compile = guidance, profile_compile
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
                compiled = compile_tasks(model, config.backend, options or None)
                self.programs[key] = (dict(compiled.entries), compiled.options)
        self.entries, self.options = self.programs[key]

    @torch.no_grad()
    def request(self, config: Config):
        if config.task == "t2i":
            return generate_latents(self.model, self.model.tokenizer, self.prompts, steps=config.steps,
                                    guidance=self.guidance, noise=self.noise, progress=False,
                                    denoise=self.entries["denoise"],
                                    rules=sampler_rules(self.options) if self.options is not None else None)
        return understanding.answer_tokens(self.model, self.model.tokenizer, self.image, self.question,
                                           max_new_tokens=self.max_new_tokens, entries=self.entries)

    def run(self, runs: int = 5, progress: bool = True, compile_warm: int = 1,
            fresh_caches: bool = True) -> list[Result]:
        """Measure every configuration; ``compile_warm`` is how many times the first request is made again (after a
        dynamo reset, on warm caches, the configurations interleaved), which compiles every configuration again
        each time (0: never); its median is the warm start's time. ``fresh_caches=False``
        gives all configurations one set of Inductor caches: a graph an earlier configuration compiled is
        then loaded, not compiled (less time in all; compile cold is then "with the earlier rows' caches")."""
        with tempfile.TemporaryDirectory(prefix="flashu-bench-") as caches:
            folders = [Path(caches) / (str(i) if fresh_caches else "shared") for i in range(len(self.configs))]
            return self._run(runs, progress, folders, compile_warm)

    def _run(self, runs: int, progress: bool, caches: list[Path], compile_warm: int) -> list[Result]:
        results = {c.name: Result(c.name, c.task) for c in self.configs}
        outputs = {}
        device = self.model.device
        bar = tqdm(total=len(self.configs) * (runs + 2 + compile_warm), desc="bench", disable=not progress)
        for i, config in enumerate(self.configs):  # cold: first request, compile included, empty caches
            r = results[config.name]
            _start_as_a_new_process()
            before = _graphs()
            with PeakRss() as rss, peak_gpu_mb(device, r), inductor_caches(caches[i]), self._profile(r, "cold"), \
                    pass_outcomes() as r.techniques:
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
                with PeakRss() as rss, peak_gpu_mb(device, r), timed_prefill(self.entries, device, r.prefill_s):
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
            # The tally counts every program, a pass-free one too; the summary says what the passes did.
            with FlopTally() as tally, summary(flops=False) as done:
                self.request(config)
            results[config.name].flops = tally.total
            if config.backend == "flashu":
                results[config.name].did = str(done)
            bar.update()
        for _ in range(compile_warm):
            self._compile_warm(results, caches, bar)
        bar.close()
        self._fidelity(results, outputs)
        return list(results.values())

    @contextlib.contextmanager
    def _profile(self, result: Result, key: str) -> Iterator[None]:
        """With ``profile_compile``, the block's compile phases in ``result.compile_profile[key]``."""
        if not self.profile_compile:
            yield
            return
        with profiling() as profile:
            yield
        result.compile_profile[key] = profile.to_dict()

    def _compile_warm(self, results: dict[str, Result], caches: list[Path], bar: tqdm) -> None:
        """First request again, after a dynamo reset, on the on-disk caches the cold request filled.

        Last, because the reset drops every configuration's compiled code. A configuration that
        compiled nothing cold (it reused another's programs, or runs eagerly) is left out. With
        ``--profile-compile`` the phases are those of the latest restart.
        """
        for i, config in enumerate(self.configs):
            r = results[config.name]
            if r.graphs:
                torch._dynamo.reset()
                self.programs.pop(config.name)
                _start_as_a_new_process()
                with inductor_caches(caches[i]), self._profile(r, "warm"):
                    t0 = time.perf_counter()
                    self._use(config)
                    self.request(config)
                    synchronize(self.model.device)
                    r.compile_warm_runs_s.append(time.perf_counter() - t0)
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
        from ...scenes.scoring import geneval_score, normalise_answer

        if config.task == "t2i":
            if not self.scenes or self.model.codec is None:
                return {}
            summary = geneval_score(self.model.codec.decode(out), self.scenes)
            return {"geneval": summary["correct"], "colour": summary["colour"]}
        if self.expected_answer is None:
            return {}
        answer = self.model.tokenizer.decode(out)
        return {"answer": answer, "correct": normalise_answer(answer) == normalise_answer(self.expected_answer)}
