"""The bench on a small model with eager lowerings (Inductor timing is what the command itself reports)."""

import json
import os
import statistics
from pathlib import Path

import pytest
import torch

from flashu_compile.models.showo2 import Showo2
from flashu_compile.options import PRESETS, FlashUOptions
from flashu_compile.tools.bench import (
    Bench,
    Config,
    Result,
    default_configs,
    inductor_caches,
    markdown,
    off_vs_inductor,
    select,
    speedups,
    split_rows,
    technique_savings,
    write,
)
from tests.conftest import small_config


@pytest.fixture(scope="module")
def results(tokenizer):
    model = Showo2.random(small_config(num_layers=4), seed=2).attach(tokenizer=tokenizer)
    c, (h, w) = model.config.image_latent_dim, model.config.latent_size
    image = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(1))
    skip = {"passes": ["layer_skip"], "lowering": "eager", "skip_ratio": 0.5, "skip_interval": 4, "hybrid_tau": 0}
    # Unguided on the last 3 of 5 calls: those calls run the conditional half of the batch only.
    guidance = {"lowering": "eager", "guidance_schedule": [[2, 7.5], [3, 0.0]]}
    configs = [Config("eager 6", "t2i", "eager", 6), Config("skip 6", "t2i", "flashu", 6, skip),
               Config("guidance 6", "t2i", "flashu", 6, guidance),
               Config("eager answer", "mmu", "eager"),
               Config("plain answer", "mmu", "flashu", options={"lowering": "eager"})]
    torch._dynamo.reset()
    bench = Bench(model, configs, ["a red circle", "a blue square"], image, "what colour is the circle?",
                  max_new_tokens=4)
    return bench.run(runs=2, progress=False, compile_warm=2)


def test_every_configuration_is_measured(results):
    by_name = {r.name: r for r in results}
    assert list(by_name) == ["eager 6", "skip 6", "guidance 6", "eager answer", "plain answer"]
    assert all(len(r.runs_s) == 2 and r.median_s > 0 and r.peak_rss_mb > 0 for r in results)
    assert all(r.recompiles == 0 for r in results)
    assert by_name["skip 6"].graphs >= 1 and by_name["eager 6"].graphs == 0
    # Skipping half the layers on 4 of 5 calls removes FLOPs; the answer without passes removes none.
    assert by_name["skip 6"].flops < by_name["eager 6"].flops
    assert by_name["plain answer"].flops == by_name["eager answer"].flops > 0
    assert by_name["eager 6"].fidelity == 0.0 and by_name["skip 6"].fidelity > 0
    assert by_name["plain answer"].fidelity == 1.0  # same tokens
    # One prefill per warm answer, timed inside it; generation rows have none.
    for name in ("eager answer", "plain answer"):
        r = by_name[name]
        assert len(r.prefill_s) == 2 and all(0 < p < t for p, t in zip(r.prefill_s, r.runs_s, strict=True))
    assert by_name["eager 6"].prefill_s == []
    assert by_name["eager answer"].tokens == by_name["plain answer"].tokens <= 4 and by_name["eager 6"].tokens is None
    # What acted on each flashu row is reported with it: the pass and the request's skipped layers.
    assert by_name["skip 6"].techniques["layer_skip"]["acted"] >= 1 and by_name["eager 6"].techniques == {}
    assert "call(s) skip" in by_name["skip 6"].did and by_name["eager 6"].did is None
    table = markdown(results, "m", "c")
    assert "skip 6: layer_skip acted on" in table and "plain answer: none ran" in table


def test_guidance_schedule_without_passes_runs_through_the_sampler(results):
    by_name = {r.name: r for r in results}
    # 2 guided calls on 2 rows per prompt and 3 unguided on 1, against 5 guided ones: 7/10 of the FLOPs.
    assert by_name["guidance 6"].flops / by_name["eager 6"].flops == pytest.approx(0.7, rel=1e-3)
    assert by_name["guidance 6"].fidelity > 0


def test_guidance_reaches_the_sampler(tokenizer):
    """Scale 0 runs the conditional rows only: half the FLOPs of a guided request."""
    model = Showo2.random(small_config(num_layers=2), seed=3).attach(tokenizer=tokenizer)
    image = torch.zeros(1, model.config.image_latent_dim, *model.config.latent_size)
    flops = {}
    for scale in (7.5, 0.0):
        bench = Bench(model, [Config("eager 3", "t2i", "eager", 3)], ["a red circle"], image, "what colour?",
                      guidance=scale)
        flops[scale] = bench.run(runs=1, progress=False)[0].flops
    assert flops[0.0] / flops[7.5] == pytest.approx(0.5, rel=1e-3)
    with pytest.raises(ValueError, match="guidance must be >= 0"):
        Bench(model, [], ["a red circle"], image, "what colour?", guidance=-1)


def test_compile_times(results):
    by_name = {r.name: r for r in results}
    assert all(r.compile_cold_s > 0 for r in results)
    # Only configurations that compiled graphs are compiled again on warm caches.
    assert by_name["eager 6"].compile_warm_s is None and by_name["eager answer"].compile_warm_s is None
    assert by_name["skip 6"].compile_warm_s > 0 and by_name["plain answer"].compile_warm_s > 0
    # Two warm restarts each, reported as their median.
    assert [len(r.compile_warm_runs_s) for r in results] == [0, 2, 2, 0, 2]
    assert by_name["skip 6"].compile_warm_s == statistics.median(by_name["skip 6"].compile_warm_runs_s)


def test_inductor_caches_are_swapped_and_restored(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "outer"))
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    torch._dynamo.reset()
    with inductor_caches(tmp_path / "inner"):
        assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "inner" / "triton")
        torch.compile(lambda x: x * 2 + 1, backend="inductor")(torch.randn(8))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "outer")
    assert "TRITON_CACHE_DIR" not in os.environ
    assert any((tmp_path / "inner").iterdir()) and not (tmp_path / "outer").exists()


def test_default_and_split_rows():
    names = [c.name for c in default_configs("plan")]
    rows = split_rows()
    assert {"flashu off 50", "flashu off answer"} <= set(names) and not set(rows) - {"flashu paper 50"} & set(names)
    split = {c.name: c for c in default_configs("plan", split=True)}
    assert set(rows) <= set(split)
    for name, passes in (("flashu prune 50", ("prune_channels",)), ("flashu skip 50", ("layer_skip",)),
                         ("flashu cache 50", ("head_cache",)), ("flashu prefix 50", ("prefix_cache",)),
                         ("flashu guidance 50", ())):
        config = split[name]
        options = FlashUOptions.from_dict(config.options)
        assert (config.task, config.backend, config.steps, options.passes) == ("t2i", "flashu", 50, passes)
        assert options.plan == "plan" and options.skip_ratio == 0.2 and options.skip_interval == 10
        paper_guidance = PRESETS["paper"]["guidance_schedule"]
        assert options.guidance_schedule == (paper_guidance if name == "flashu guidance 50" else None)


def _result(name: str, task: str, median: float, flops: int) -> Result:
    return Result(name, task, runs_s=[median], flops=flops, compile_cold_s=30.0)


def test_off_ratio_and_savings_by_technique_are_reported():
    results = [_result("inductor 50", "t2i", 2.0, 400), _result("flashu off 50", "t2i", 2.2, 400),
               _result("flashu prune 50", "t2i", 1.5, 300), _result("flashu guidance 50", "t2i", 2.0, 400),
               _result("inductor answer", "mmu", 0.10, 8), _result("flashu off answer", "mmu", 0.102, 8)]
    assert off_vs_inductor(results) == pytest.approx({"flashu off 50": 1.1, "flashu off answer": 1.02})
    saved = technique_savings(results)
    assert saved["flashu prune 50"] == {"technique": "prune_channels", "baseline": "inductor 50", "flops_saved": 0.25}
    assert saved["flashu guidance 50"]["flops_saved"] == 0
    table = markdown(results, "m", "c")
    assert "flashu off 50 / inductor 50: 1.100 (over 5%)" in table
    assert "flashu off answer / inductor answer: 1.020 (within 5%)" in table
    assert "| prune_channels | flashu prune 50 | 0.00 | 25.0% | 1.33 | - |" in table
    results[1].compile_warm_runs_s = [4.5, 3.9, 4.0]  # the median of the warm restarts
    assert "| flashu off 50 | 2.200 |" in table and "| 30.0 | - |" in table  # compile cold, compile warm
    assert "| 30.0 | 4.0 |" in markdown(results, "m", "c")


def test_reports(results, tmp_path):
    table = write(results, tmp_path, "test machine", "flashu-compile bench --runs 2")
    assert "| skip 6 |" in table and "test machine" in table
    payload = json.loads((tmp_path / "bench.json").read_text())
    assert [r["name"] for r in payload["results"]] == [r.name for r in results]
    assert payload["speedups"]["skip 6"]["flop_ratio_vs_eager"] > 1
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert speedups(results)["eager 6"]["vs_eager"] == 1.0


def test_unknown_configuration_is_named():
    with pytest.raises(ValueError, match=r"unknown bench configuration\(s\) \['fast'\]; choose from \['a'\]"):
        select([Config("a", "t2i", "eager")], ["fast"])


def test_cudagraph_rows_only_where_asked():
    from flashu_compile.tools.bench import CUDAGRAPH_ROWS

    assert not set(CUDAGRAPH_ROWS) & {c.name for c in default_configs("plan", split=True)}
    rows = {c.name: c for c in default_configs("plan", cudagraphs=True)}
    assert rows["inductor 50 cudagraphs"].options == {"triton.cudagraphs": True}  # Inductor's reduce-overhead
    options = FlashUOptions.from_dict(rows["flashu paper 35 cudagraphs"].options)
    assert options.cudagraphs and options.passes == PRESETS["paper"]["passes"] and options.plan == "plan"


def test_flops_of_a_cudagraph_row_are_counted_on_the_eager_lowering(tokenizer):
    model = Showo2.random(small_config(), seed=4).attach(tokenizer=tokenizer)
    image = torch.zeros(1, model.config.image_latent_dim, *model.config.latent_size)
    bench = Bench(model, [], ["a red circle"], image, "what colour?")
    bench._use(Config("cg", "t2i", "flashu", 3, {"preset": "paper", "cudagraphs": True}), lowering="eager")
    assert bench.options.lowering == "eager" and not bench.options.cudagraphs


def test_gpu_memory_column_only_for_gpu_runs():
    rows = [_result("eager 50", "t2i", 2.0, 400), _result("inductor 50", "t2i", 1.0, 400)]
    assert "peak GPU" not in markdown(rows, "m", "c")
    rows[0].peak_gpu_mb, rows[1].peak_gpu_mb = 3000.4, 3500.0
    table = markdown(rows, "m", "c")
    assert "| peak RSS (MB) | peak GPU (MB) | graphs |" in table and "| 0 | 3000 | 0 | 0 |" in table


def _bench_args(*extra: str):
    from flashu_compile.tools.cli import build_parser

    return build_parser().parse_args(["bench", "--model", "tiny", *extra])


def test_arguments_are_checked_before_any_work(monkeypatch, tmp_path, capsys):
    from flashu_compile.tools import bench
    from flashu_compile.tools.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench.cli, "run_bench", lambda *a: pytest.fail("the model loaded"))
    assert main(["bench", "--model", "tiny", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "error: --device cuda: no CUDA device is available" in capsys.readouterr().err
    assert main(["bench", "--model", "tiny", "--only", "inductor 50 cudagraph", "--out", str(tmp_path)]) == 2
    assert "unknown bench configuration(s) ['inductor 50 cudagraph']" in capsys.readouterr().err
    assert main(["bench", "--dtype", "float8"]) == 2
    assert bench.check_args(_bench_args("--dtype", "bfloat16", "--out", str(tmp_path))) == (
        torch.device("cpu"), torch.bfloat16)


def test_official_sizes_keep_the_official_sequence():
    """The showo2-* rows: 729 image tokens, prompts padded to the 290-token budget, 1024 positions a row."""
    from flashu_compile.models.showo2.configuration import preset
    from flashu_compile.models.showo2.sequences import t2i_rows
    from flashu_compile.models.showo2.tokenizer import SceneTokenizer
    from flashu_compile.tools.bench import OFFICIAL

    for name in OFFICIAL:
        config = preset(name)
        assert (config.num_image_tokens, config.max_text_len, config.latent_codec) == (729, 290, "wan2.1-vae")
        assert len(SceneTokenizer()) <= config.llm_vocab_size  # the stand-in tokenizer fits the vocabulary
        rows = t2i_rows(SceneTokenizer(), ["a red circle"], config.num_image_tokens, config.max_text_len, True)
        assert rows.text_tokens.shape == (2, 1024)


def test_model_without_codec_is_calibrated_and_asked_on_random_latents(monkeypatch, tokenizer):
    import argparse

    from flashu_compile.tools import bench

    # Stands for an official size: a model built on the device with the scenes tokenizer and no codec.
    monkeypatch.setattr(bench.loading, "OFFICIAL", ("tiny",))
    args = argparse.Namespace(model="tiny", seed=0, plan=None, no_progress=True)
    model = bench.load_model(args, torch.device("cpu"), torch.bfloat16)
    assert model.dtype == torch.bfloat16 and type(model.tokenizer).__name__ == "SceneTokenizer"
    model.codec = None
    plan = bench.load_plan(args, model)
    assert plan.settings["samples"] == {"t2i": 8, "mmu": 8}
    latent = bench.random_latents(model, 1, 0)
    assert latent.shape == (1, model.config.image_latent_dim, *model.config.latent_size)


def test_profile_compile_reports_phases_cold_and_warm(tokenizer, tmp_path):
    model = Showo2.random(small_config(num_layers=2), seed=6).attach(tokenizer=tokenizer)
    image = torch.zeros(1, model.config.image_latent_dim, *model.config.latent_size)
    skip = {"passes": ["layer_skip"], "lowering": "eager", "skip_ratio": 0.5, "hybrid_tau": 0}
    configs = [Config("eager 3", "t2i", "eager", 3), Config("skip 3", "t2i", "flashu", 3, skip)]

    def run(profile_compile: bool) -> list[Result]:
        torch._dynamo.reset()  # each run compiles its own graphs
        bench = Bench(model, configs, ["a red circle"], image, "what colour?", profile_compile=profile_compile)
        return bench.run(runs=1, progress=False)

    plain, profiled = run(False), run(True)
    assert all(not r.compile_profile for r in plain)
    eager, skipped = profiled
    assert eager.compile_profile.keys() == {"cold"}  # nothing compiled: no warm first request
    assert skipped.compile_profile.keys() == {"cold", "warm"}
    for span in skipped.compile_profile.values():
        counts = {row["phase"]: row["count"] for row in span["phases"]}
        assert counts["pass layer_skip"] == 1 and counts["outlining"] == 2
        assert sum(row["seconds"] for row in span["phases"]) == pytest.approx(span["total_s"])
    table = write(profiled, tmp_path, "m", "c")
    assert "Compile time by phase, skip 3" in table and "| pass layer_skip | " in table
    saved = json.loads((tmp_path / "bench.json").read_text())["results"][1]["compile_profile"]
    assert saved == skipped.compile_profile


def test_profile_compile_flag_reaches_the_harness(monkeypatch, tokenizer, tmp_path):
    from flashu_compile.tools import bench

    seen = {}

    class Harness:
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)

        def run(self, *args, **kwargs):
            return []

    monkeypatch.setattr(bench.cli, "load_model", lambda *a: Showo2.random(small_config(), seed=1).attach(
        tokenizer=tokenizer))
    monkeypatch.setattr(bench.cli, "load_plan", lambda *a: None)
    monkeypatch.setattr(bench.cli, "Bench", Harness)
    for flag, expected in (([], False), (["--profile-compile"], True)):
        args = _bench_args(*flag, "--out", str(tmp_path), "--only", "inductor 50", "--prompts", "1")
        assert bench.run_bench(args, torch.device("cpu"), torch.float32) == []
        assert seen["profile_compile"] is expected


@pytest.mark.parametrize("error, status", [(OSError(28, "No space left on device"), 2), (KeyboardInterrupt(), 130)])
def test_reports_cut_short_leave_no_partial_file(results, error, status, monkeypatch, tmp_path, write_fails_midway,
                                                capsys):
    """bench.json stops halfway (a full disk, Ctrl-C): the previous bench.json stays, and no half of the new one."""
    from flashu_compile.tools import bench
    from flashu_compile.tools.cli import main

    (tmp_path / "bench.json").write_text('{"previous": "run"}')
    monkeypatch.setattr(bench.cli, "run_bench", lambda *a: results)
    write_fails_midway("bench.json", error)
    assert main(["bench", "--out", str(tmp_path), "--no-progress"]) == status
    assert "Traceback" not in capsys.readouterr().err
    assert (tmp_path / "bench.json").read_text() == '{"previous": "run"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.md"]  # no temporary file left


def test_chart_is_written_whole(results, monkeypatch, tmp_path):
    """The chart goes through the same atomic writer: a failing savefig leaves no bench.png and no temporary file."""
    import matplotlib.figure

    def savefig(self, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    with pytest.raises(OSError):
        write(results, tmp_path, "m", "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.md"]


def test_rows_named_by_what_they_run():
    """Any preset at any step count is one --only name: the comparison of fast and paper 35 is one command."""
    rows = select(default_configs("plan"), ["flashu fast 35", "flashu paper 35", "eager 20", "flashu fast answer"],
                  "plan")
    assert [r.name for r in rows] == ["flashu paper 35", "flashu fast 35", "eager 20", "flashu fast answer"]
    fast = rows[1]
    assert (fast.task, fast.backend, fast.steps, fast.options) == ("t2i", "flashu", 35, {"preset": "fast",
                                                                                          "plan": "plan"})
    assert (rows[2].backend, rows[2].steps, rows[3].task) == ("eager", 20, "mmu")
    with pytest.raises(ValueError, match=r"unknown bench configuration\(s\) \['flashu quick 35'\].*'flashu PRESET N'"):
        select(default_configs("plan"), ["flashu quick 35"])
    with pytest.raises(ValueError, match=r"\['flashu fast 1'\]: grid points must be in \[2, 10000\]"):
        select(default_configs("plan"), ["flashu fast 1"])


def test_each_cold_row_traces_as_a_fresh_process_would():
    """A row's cold compile must not inherit the sizes an earlier row's compile of the same function saw change
    (the answer's decode step is one function for every backend): it traced symbolic where a fresh process, and
    the row's own warm start, trace static, so the warm start missed the caches the cold one filled."""
    from flashu_compile.tools.bench.harness import _start_as_a_new_process

    def step(x):
        return x * 2

    def traced_inputs(fn, x):
        seen = []

        def backend(gm, example_inputs):
            seen.append([n.meta["example_value"] for n in gm.graph.nodes if n.op == "placeholder"])
            return gm.forward

        torch.compile(fn, backend=backend)(x)
        return seen

    torch._dynamo.reset()
    earlier = torch.compile(step, backend="eager")
    earlier(torch.ones(3))
    earlier(torch.ones(4))  # dynamo now marks the size dynamic for this code object
    inherited = traced_inputs(step, torch.ones(5))
    assert any(isinstance(s, torch.SymInt) for v in inherited[0] for s in getattr(v, "shape", ())), inherited
    earlier(torch.ones(6))
    _start_as_a_new_process()
    fresh = traced_inputs(step, torch.ones(7))
    assert all(isinstance(s, int) for v in fresh[0] for s in getattr(v, "shape", ())), fresh
    torch._dynamo.reset()
