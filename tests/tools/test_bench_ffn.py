"""``bench-ffn``: the pruned layer is measured through the real pass, with FLOPs that fall with the ratio."""

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


def test_bad_ratio_is_an_error(capsys):
    assert main(["bench-ffn", "--ratios", "1.2"]) == 2
    assert "--ratios in [0, 1)" in capsys.readouterr().err
