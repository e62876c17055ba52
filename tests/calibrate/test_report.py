"""Specialization report (table, chart) and the ``calibrate`` command line."""

import sys

import pytest
import torch

from flashu_compile.calibrate import Plan, draw_specialization, format_specialization, specialization

pytestmark = pytest.mark.usefixtures("one_thread")


def _idx(values):
    return torch.tensor(values, dtype=torch.int64)


@pytest.fixture
def plan():
    scores = [torch.arange(8, dtype=torch.float64)] * 3
    return Plan(
        layer_paths=[f"showo.model.layers.{i}" for i in range(3)],
        intermediate_sizes=[8, 8, 8],
        keep={"t2i": [_idx([0, 1, 2, 3]), _idx([0, 1, 2, 3]), _idx([0, 1, 2, 3])],
              "mmu": [_idx([2, 3, 4, 5]), _idx([0, 1, 2, 3]), _idx([4, 5, 6, 7])]},
        scores={"t2i": scores, "mmu": scores},
        settings={},
        fingerprint="0" * 64,
    )


def test_specialization_jaccard(plan):
    rows = specialization(plan)
    assert [r["path"] for r in rows] == plan.layer_paths
    assert rows[0]["jaccard"] == pytest.approx(2 / 6)  # {2, 3} shared of {0..5}
    assert rows[1]["jaccard"] == 1.0 and rows[2]["jaccard"] == 0.0
    assert (rows[0]["shared"], rows[0]["t2i_only"], rows[0]["mmu_only"]) == (2, 2, 2)
    assert rows[2]["kept"] == {"t2i": 4, "mmu": 4}


def test_specialization_needs_both_tasks(plan):
    plan.keep.pop("mmu")
    plan.scores.pop("mmu")
    rows = specialization(plan)
    assert all(r["jaccard"] is None for r in rows) and rows[0]["kept"] == {"t2i": 4}
    text = format_specialization(plan)
    assert "Jaccard" not in text and "kept t2i" in text


def test_format_specialization(plan):
    lines = format_specialization(plan).splitlines()
    assert lines[0].split() == ["layer", "path", "FFN", "kept", "t2i", "kept", "mmu", "shared", "t2i", "only",
                                "mmu", "only", "Jaccard"]
    assert lines[2].split() == ["0", "showo.model.layers.0", "8", "4", "4", "2", "2", "2", "0.333"]
    assert lines[-1] == "mean Jaccard(t2i, mmu) = 0.444 over 3 layers"
    assert "Jaccard 0.444" in plan.summary()


def test_draw_specialization_writes_a_png(plan, tmp_path):
    from PIL import Image

    out = draw_specialization(plan, tmp_path / "charts" / "spec.png")
    assert out == tmp_path / "charts" / "spec.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as image:
        assert image.width > 300 and image.height > 300


def test_draw_specialization_without_matplotlib(plan, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'flashu-compile\[plot\]'"):
        draw_specialization(plan, tmp_path / "spec.png")
    assert not (tmp_path / "spec.png").exists()


def test_cli_calibrates_the_default_model(tmp_path, capsys):
    from flashu_compile.models.showo2 import Showo2
    from flashu_compile.tools.cli import main

    out = tmp_path / "plans" / "default"
    code = main(["calibrate", "--model", "default", "--tasks", "t2i", "mmu", "--prune-ratio", "0.2",
                 "--multiple", "64", "--steps", "3", "--samples", "2", "--no-progress", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "mean Jaccard(t2i, mmu)" in printed and "showo.model.layers.3" in printed
    plan = Plan.load(out, model=Showo2.default())
    assert plan.intermediate_sizes == [352] * 4
    assert all(len(k) == 256 for task in ("t2i", "mmu") for k in plan.keep[task])
    assert plan.settings["steps"] == 3 and plan.settings["samples"] == {"t2i": 2, "mmu": 2}
    png = tmp_path / "plans" / "default-specialization.png"
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_reports_bad_arguments(tmp_path, capsys):
    from flashu_compile.tools.cli import main

    code = main(["calibrate", "--model", "tiny", "--prune-ratio", "1.5", "--out", str(tmp_path / "p")])
    assert code == 2
    assert "--prune-ratio must be in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
