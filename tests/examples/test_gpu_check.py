"""examples/gpu_check.py: its CPU path end to end (two eager rows of the tiny model), its rows, its argument errors."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_path_writes_the_reports_and_prints_the_table(tmp_path):
    out = tmp_path / "reports"
    # The script puts the project on sys.path itself: run from the root without PYTHONPATH, as on the GPU machine.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--model", "tiny", "--out", str(out),
                          "--runs", "1", "--only", "eager 50", "eager+kv answer", "--no-progress"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| eager 50 |" in run.stdout and "| eager+kv answer |" in run.stdout
    assert {p.name for p in out.iterdir()} == {"bench.md", "bench.json", "bench.png"}
    table = (out / "bench.md").read_text()
    assert table.startswith("## tiny\n") and "--device cpu --dtype float32" in table
    payload = json.loads((out / "bench.json").read_text())
    assert list(payload) == ["tiny"] and payload["tiny"]["seconds"] > 0
    assert [r["name"] for r in payload["tiny"]["results"]] == ["eager 50", "eager+kv answer"]
    assert all(r["peak_gpu_mb"] is None and len(r["runs_s"]) == 1 for r in payload["tiny"]["results"])


def test_rows_and_defaults_per_model():
    gpu_check = _load()
    args = gpu_check.parse([])
    assert (args.device, args.model) == ("cuda", "showo2-1.5b,showo2-7b")
    small = gpu_check.bench_argv(args, "showo2-1.5b")
    assert small[small.index("--runs") + 1] == "3" and small[small.index("--dtype") + 1] == "bfloat16"
    assert small[small.index("--only") + 1:] == gpu_check.T2I and "inductor 50 cudagraphs" in small
    large = gpu_check.bench_argv(args, "showo2-7b")
    assert large[large.index("--runs") + 1] == "2" and large[large.index("--only") + 1:] == gpu_check.MMU
    cpu = gpu_check.bench_argv(gpu_check.parse(["--device", "cpu"]), "tiny")
    assert cpu[cpu.index("--dtype") + 1] == "float32" and not set(gpu_check.CUDAGRAPH_ROWS) & set(cpu)
    # The tiny model's two layers leave none to drop tokens after (the paper's K = 2): its answer row has no passes.
    assert "flashu off answer" in cpu and "flashu paper answer" not in cpu and cpu[cpu.index("--runs") + 1] == "1"


def test_bad_arguments_exit_2_before_any_model_loads(monkeypatch, tmp_path, capsys):
    from flashu_compile.tools import bench

    gpu_check = _load()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench, "run_bench", lambda *a: pytest.fail("a model loaded"))
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"gpu_check: error: --device cuda: no CUDA device is available "
                                       f"(torch {torch.__version__}, CUDA {torch.version.cuda or 'not built in'})\n")
    assert gpu_check.main(["--device", "cpu", "--model", " , ", "--out", str(tmp_path)]) == 2
    assert "--model names no model" in capsys.readouterr().err
    assert gpu_check.main(["--device", "cpu", "--runs", "0", "--out", str(tmp_path)]) == 2
    assert "--runs must be an int >= 1, got 0" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_failing_model_leaves_the_others_reported(monkeypatch, tmp_path, capsys):
    from flashu_compile.tools import bench

    gpu_check = _load()

    def run_bench(args, device, dtype):
        if args.model == "first":
            raise RuntimeError("compilation broke")
        return [bench.Result("eager 50", "t2i", runs_s=[1.0], flops=10)]

    monkeypatch.setattr(bench, "run_bench", run_bench)
    assert gpu_check.main(["--device", "cpu", "--model", "first,second", "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "RuntimeError: compilation broke" in captured.err and "failed: first" in captured.out
    table = (tmp_path / "bench.md").read_text()
    assert table.startswith("## second\n") and "## first" not in table and "| eager 50 | 1.000 |" in table
