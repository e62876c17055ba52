"""``flashu-compile build-trt``: on a machine without TensorRT it stops at once and says why."""

import pytest

from flashu_compile.backends.tensorrt import tensorrt_unavailable_reason
from flashu_compile.tools.cli import main


@pytest.mark.skipif(tensorrt_unavailable_reason() is None, reason="TensorRT is available: error path not reachable")
def test_build_trt_names_what_is_missing(tmp_path, capsys):
    out = tmp_path / "engines"
    assert main(["build-trt", "--model", "default", "--preset", "paper", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flashu-compile build-trt: error: TensorRT engines cannot be built on this machine: ")
    assert tensorrt_unavailable_reason() in err
    assert not out.exists()  # nothing loaded, calibrated or written


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
