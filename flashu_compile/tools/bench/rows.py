"""What a bench row is: a configuration (task, backend, steps, options) and its measured result; the default rows."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from ...options import PRESETS
from ...passes.registry import REGISTRY, PassSpec
from ...validate import MAX_STEPS


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
    # the same after torch._dynamo.reset(), on-disk caches warm: each restart's time, and their median
    compile_warm_runs_s: list[float] = field(default_factory=list)
    flops: int = 0
    peak_rss_mb: float = 0.0
    graphs: int = 0
    recompiles: int = 0
    fidelity: float | None = None  # t2i: relative error of the final latent; mmu: token agreement
    scores: dict = field(default_factory=dict)
    peak_gpu_mb: float | None = None  # torch.cuda.max_memory_allocated over its runs; None off the GPU
    tokens: int | None = None  # mmu: tokens in the answer (it stops at eos), which its time depends on
    # --profile-compile: "cold" and "warm" -> CompileProfile.to_dict() of that first request
    compile_profile: dict = field(default_factory=dict)
    did: str | None = None  # flashu: what the compiler did on the FLOP-counted request (flashu_compile.summary())
    # the passes that ran while its first request compiled: on how many graphs each acted, why not on the others
    techniques: dict = field(default_factory=dict)

    @property
    def median_s(self) -> float:
        return statistics.median(self.runs_s)

    @property
    def compile_warm_s(self) -> float | None:
        return statistics.median(self.compile_warm_runs_s) if self.compile_warm_runs_s else None


def _technique_passes() -> list[PassSpec]:
    """The passes with a bench row (the registry's ``bench_row``): the paper preset's first, each group in
    canonical order."""
    paper = PRESETS["paper"]["passes"]
    return sorted((s for s in REGISTRY.values() if s.bench_row is not None), key=lambda s: s.name not in paper)


def split_rows() -> dict[str, str]:
    """The per-technique rows (``--split``), row name -> technique: what each generation technique saves on its
    own, at the paper preset's settings. The pass rows drop the guidance schedule so that each row changes one
    thing."""
    rows = {f"flashu {s.bench_row.short} 50": s.bench_row.technique for s in _technique_passes()}
    return rows | {"flashu guidance 50": "guidance schedule", "flashu paper 50": "all of the paper preset"}


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
        configs += [Config(f"flashu {s.bench_row.short} 50", "t2i", "flashu", 50,
                           paper | {"passes": [s.name], "guidance_schedule": None}) for s in _technique_passes()]
        # No pass: the graphs are lowered as by preset "off"; only the sampler's guidance scales change.
        configs.append(Config("flashu guidance 50", "t2i", "flashu", 50, paper | {"passes": []}))
    return configs if cudagraphs else [c for c in configs if c.name not in CUDAGRAPH_ROWS]


def named_row(name: str, plan) -> Config | None:
    """A row named by what it runs: ``"eager N"``, ``"inductor N"`` or ``"flashu PRESET N"`` (text-to-image at N
    grid points), or ``"flashu PRESET answer"``; None for any other name."""
    parts = name.split()
    if len(parts) == 2 and parts[0] in ("eager", "inductor") and parts[1].isdigit():
        return Config(name, "t2i", parts[0], int(parts[1]))
    if len(parts) == 3 and parts[0] == "flashu" and parts[1] in PRESETS:
        options = {"preset": parts[1], "plan": plan}
        if parts[2] == "answer":
            return Config(name, "mmu", "flashu", options=options)
        if parts[2].isdigit():
            return Config(name, "t2i", "flashu", int(parts[2]), options)
    return None


def select(configs: list[Config], only: list[str] | None, plan=None) -> list[Config]:
    """``configs``, or the rows ``only`` names: those of ``configs`` in their order, then those :func:`named_row`
    builds, in the order given."""
    if not only:
        return configs
    known = {c.name: c for c in configs}
    built = {name: named_row(name, plan) for name in dict.fromkeys(only) if name not in known}
    unknown = [name for name, row in built.items() if row is None]
    if unknown:
        raise ValueError(f"unknown bench configuration(s) {unknown}; choose from {list(known)}, or name one "
                         f"'eager N', 'inductor N', 'flashu PRESET N' or 'flashu PRESET answer' (presets: "
                         f"{list(PRESETS)})")
    bad = [name for name, row in built.items() if row.task == "t2i" and not 2 <= row.steps <= MAX_STEPS]
    if bad:
        raise ValueError(f"bench configuration(s) {bad}: grid points must be in [2, {MAX_STEPS}]")
    return [c for c in configs if c.name in only] + list(built.values())
