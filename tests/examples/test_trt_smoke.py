"""examples/trt_smoke.py on a machine without CUDA or torch-tensorrt: exit 2 and say what is missing."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from flashu_compile.backends.tensorrt import tensorrt_unavailable_reason

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "trt_smoke.py"


@pytest.mark.skipif(tensorrt_unavailable_reason() is None, reason="TensorRT is available: error path not reachable")
def test_missing_tensorrt_or_cuda_exits_2_with_the_reason():
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == f"trt_smoke: error: {tensorrt_unavailable_reason()}\n"


def test_missing_cuda_with_torch_tensorrt_installed_exits_2(monkeypatch, capsys):
    from flashu_compile.backends import tensorrt

    monkeypatch.setitem(sys.modules, "torch_tensorrt", type(sys)("torch_tensorrt"))  # an installed stand-in
    monkeypatch.setattr(tensorrt.torch.cuda, "is_available", lambda: False)
    spec = importlib.util.spec_from_file_location("trt_smoke", SCRIPT)
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    assert smoke.main([]) == 2
    assert capsys.readouterr().err == "trt_smoke: error: TensorRT needs a CUDA device and none is available\n"
