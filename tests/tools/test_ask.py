"""``flashu-compile ask``: answers through the flashu backend, clear errors for bad input."""

import sys

import pytest
import torch

from flashu_compile.models.showo2 import Showo2
from flashu_compile.scenes.dataset import make_split, to_tensor
from flashu_compile.tools import common
from flashu_compile.tools.cli import main


def test_ask_answers_a_held_out_scene_like_the_eager_model(capsys):
    torch._dynamo.reset()
    assert main(["ask", "--preset", "off", "--lowering", "eager", "--scene", "2", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    scene = make_split("test", 3, seed=0)[2]
    question = scene.qa[0][0]
    want = Showo2.default().answer((to_tensor(scene.render()) + 1) / 2, question, max_new_tokens=4)
    assert f"Q: {question}\nA: {want}" in out
    assert "first answer" in out and "then" in out


def test_ask_reports_a_missing_or_unreadable_image(tmp_path, capsys):
    assert main(["ask", "--image", str(tmp_path / "nope.png")]) == 2
    assert "no image at" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert main(["ask", "--image", str(broken)]) == 2
    assert "is not a readable image" in capsys.readouterr().err


def test_ask_rejects_an_unknown_preset_before_loading(capsys):
    assert main(["ask", "--preset", "fastest"]) == 2
    assert "option 'preset' must be one of" in capsys.readouterr().err


def test_ask_names_a_missing_torch_tensorrt_before_loading(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # `import torch_tensorrt` fails, installed or not
    monkeypatch.setattr(common, "load_model", lambda args: pytest.fail("the model loaded"))
    assert main(["ask", "--lowering", "tensorrt"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flashu-compile ask: error: lowering 'tensorrt' cannot be used on this machine: ")
    assert "torch-tensorrt is not installed" in err and "Traceback" not in err


def test_ask_checks_its_plan_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "load_model", lambda args: pytest.fail("the model loaded"))
    assert main(["ask", "--plan", str(tmp_path / "nope")]) == 2
    assert "error: --plan: plan directory" in capsys.readouterr().err
