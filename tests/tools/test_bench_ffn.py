"""``bench-ffn``: the pruned layer is measured through the real pass, with FLOPs that fall with the ratio."""

import re

import pytest

from flashu_compile.tools import bench_ffn
from flashu_compile.tools.bench_ffn import markdown, run
from flashu_compile.tools.cli import main


def test_pruned_layers_count_fewer_flops():
    results = run(hidden=32, ffn=256, heads=4, kv_heads=2, tokens=8, ratios=(0.0, 0.5), runs=2, lowering="eager")
    full, half = results
    assert (full.kept, half.kept) == (256, 128)
    # Only the FFN shrinks: half its three matmuls' FLOPs go, attention and norms stay.
    ffn_flops = 3 * 2 * 8 * 32 * 256
    assert full.flops - half.flops == ffn_flops // 2
    assert len(half.runs_s) == 2 and half.median_s > 0
    table = markdown(results, "header")
    assert "| 0.50 | 128 |" in table and table.startswith("header")


@pytest.mark.parametrize("argv, message", [
    (["--ratios", "1.2"], r"--ratios must be in \[0, 1\), got 1.2"),
    (["--ratios", "nan"], "--ratios must be a finite number, got nan"),
    (["--hidden", "-1"], r"--hidden must be an int in \[1, 65536\], got -1"),  # was a traceback from torch
    (["--heads", "0"], r"--heads must be an int in \[1, 1536\], got 0"),  # was a ZeroDivisionError
    (["--hidden", "1000000000000"], r"--hidden must be an int in \[1, 65536\]"),  # was terabytes of weights
    (["--ffn", "0"], r"--ffn must be an int in \[1, 65536\], got 0"),
    (["--kv-heads", "0"], r"--kv-heads must be an int in \[1, 12\], got 0"),
    (["--tokens", "0"], r"--tokens must be an int in \[1, 65536\], got 0"),
    (["--runs", "0"], "--runs must be an int >= 1, got 0"),
    (["--heads", "7"], "--hidden 1536 must be --heads 7 times an even head size"),
    (["--hidden", "36", "--heads", "12"], "--hidden 36 must be --heads 12 times an even head size"),  # RoPE pairs
    (["--kv-heads", "5"], "--heads 12 must be a multiple of --kv-heads 5"),
])
def test_bad_arguments_are_errors_before_any_work(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(bench_ffn, "run", lambda *a: pytest.fail("measured with bad arguments"))
    assert main(["bench-ffn", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flashu-compile bench-ffn: error: ") and re.search(message, err), err
