"""``flashu-compile build-trt``: on a machine without TensorRT, or with a bad argument, it stops at once and says
why."""

import sys

import pytest

from flashu_compile.backends.tensorrt import tensorrt_unavailable_reason
from flashu_compile.tools import common
from flashu_compile.tools.cli import main


def test_build_trt_names_what_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # `import torch_tensorrt` fails, installed or not
    monkeypatch.setattr(common, "load_model", lambda args: pytest.fail("the model loaded"))
    out = tmp_path / "engines"
    assert main(["build-trt", "--model", "default", "--preset", "paper", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flashu-compile build-trt: error: lowering 'tensorrt' cannot be used on this machine: ")
    assert tensorrt_unavailable_reason() in err and "torch-tensorrt is not installed" in err
    assert not out.exists()  # nothing loaded, calibrated or written


@pytest.mark.parametrize("argv, message", [
    (["--steps", "1"], r"--steps must be an int in \[2, 10000\], got 1"),
    (["--prompt", " "], "--prompt must not be empty"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be an int >= 1, got 0"),
    (["--plan", "nowhere"], "--plan: plan directory nowhere does not exist"),
])
def test_build_trt_checks_its_arguments_first(argv, message, tmp_path, monkeypatch, capsys):
    import re

    monkeypatch.setattr(common, "load_model", lambda args: pytest.fail("the model loaded"))
    assert main(["build-trt", "--out", str(tmp_path / "engines"), *argv]) == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.skipif(tensorrt_unavailable_reason() is not None,
                    reason=f"TensorRT lowering not runnable here: {tensorrt_unavailable_reason()}")
def test_build_trt_writes_engines_and_manifest(tmp_path):
    import json

    assert main(["build-trt", "--preset", "off", "--steps", "3", "--out", str(tmp_path), "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    # Every entry point compile_tasks compiles, each with at least one program, and the engines on disk.
    assert set(manifest["entry_points"]) == {"embed", "denoise", "prefill", "decode"}
    assert all(manifest["entry_points"].values()) and manifest["engine_entries"]
    assert all((tmp_path / "engines" / e / "blob.bin").is_file() for e in manifest["engine_entries"])
