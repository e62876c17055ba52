"""``flashu-compile``: every bad input is ``error: ...`` with exit status 2, before any expensive work; Ctrl-C is
``interrupted`` with status 130."""

import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from flashu_compile.tools import common
from flashu_compile.tools.cli import main


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a command gets as far as loading a model."""
    def load(args):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(common, "load_model", load)


def run(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("argv, message", [
    (["ask", "--scene", "-1"], r"--scene must be an int >= 0, got -1"),  # was an IndexError
    (["ask", "--question", ""], "--question must not be empty"),  # was replaced by the scene's question
    (["ask", "--question", "  "], "--question must not be empty"),
    (["demo", "--guidance", "nan"], "--guidance must be a finite number, got nan"),
    (["demo", "--steps", "1"], r"--steps must be an int in \[2, 10000\], got 1"),
    (["demo", "--prompt", ""], "--prompt #1 must not be empty"),
    (["calibrate", "--out", "."], "--out '.' must name a new or earlier output folder"),  # a traceback after minutes
    (["calibrate", "--out", ".."], "--out '..' must name"),
    (["calibrate", "--guidance", "inf"], "--guidance must be a finite number, got inf"),
    (["calibrate", "--batch-size", "0"], "--batch-size must be an int >= 1, got 0"),
    (["graph-diff", "-O", "passes=null"], "option 'passes' must be a list of pass names"),  # was a TypeError
    (["graph-diff", "-O", "guidance_schedule=[[2.7, 7.5]]"], r"'guidance_schedule'\[0\] steps must be an int"),
    (["graph-diff", "--step", "99"], r"--step must be an int in \[1, 49\], got 99"),
    (["graph-diff", "--tolerance", "nan"], "--tolerance must be a finite number"),
    (["bench", "--runs", "0"], "--runs must be an int >= 1, got 0"),
    (["bench", "--compile-warm-runs", "0"], "--compile-warm-runs must be an int >= 1, got 0"),
    (["bench", "--no-compile-warm", "--compile-warm-runs", "3"], "--no-compile-warm leaves out the warm start"),
    (["bench", "--guidance=-inf"], "--guidance must be a finite number"),
])
def test_bad_arguments_are_errors_before_the_model_loads(argv, message, no_model, capsys):
    import re

    err = run(argv, capsys)
    assert err.startswith(f"flashu-compile {argv[0]}: error: ") and re.search(message, err), err


def test_demo_refuses_an_existing_file_as_its_output_folder(tmp_path, no_model, capsys):
    """--out is a folder whose t2i.png is replaced atomically; a file there is never overwritten."""
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    assert "exists and is a file" in run(["demo", "--out", str(taken)], capsys)
    assert taken.read_text() == "keep me"
    assert "is a file" in run(["demo", "--out", str(taken / "sub")], capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_calibrate_refuses_a_read_only_folder(tmp_path, no_model, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert "is not writable" in run(["calibrate", "--out", str(locked / "plan")], capsys)
    finally:
        locked.chmod(0o755)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs a folder nobody can write into")
def test_calibrate_refuses_a_folder_nobody_can_write(no_model, capsys):
    assert "is not writable" in run(["calibrate", "--out", "/proc/self/plan"], capsys)


def test_a_decompression_bomb_is_a_readable_error(tmp_path, monkeypatch, no_model, capsys):
    bomb = tmp_path / "bomb.png"
    Image.new("RGB", (64, 64)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 4)  # 64x64 is then a bomb (over twice the limit)
    assert "is not a readable image" in run(["ask", "--image", str(bomb)], capsys)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 - 1)  # over the limit: Pillow only warns
    assert "is not a readable image" in run(["ask", "--image", str(bomb)], capsys)


def test_an_inconsistent_llm_config_is_an_error(tmp_path, capsys):
    from flashu_compile.models.showo2 import Showo2

    folder = tmp_path / "ckpt"
    Showo2.from_preset("tiny").save_pretrained(str(folder))
    (folder / "SHA256SUMS").unlink()  # edited by hand below, as an official checkpoint (no listing) would be
    llm = folder / "llm" / "config.json"
    original = json.loads(llm.read_text())
    for change, message in (({"num_key_value_heads": 3}, "must be a multiple of llm.num_key_value_heads"),
                            ({"hidden_size": "64"}, "hidden_size"), ({"num_hidden_layers": -1}, "num_hidden_layers")):
        llm.write_text(json.dumps({**original, **change}))
        assert message in run(["ask", "--model", str(folder), "--preset", "off", "--lowering", "eager"], capsys)


def test_usage_errors_and_help_return_instead_of_exiting(capsys):
    assert main(["demo", "--steps", "many"]) == 2
    assert "invalid int value" in capsys.readouterr().err
    assert main(["--help"]) == 0


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("argv", [
    ["demo", "--out", "{tmp}/out"],
    ["ask"],
    ["calibrate", "--out", "{tmp}/out"],
    ["graph-diff", "--out", "{tmp}/out"],
    ["bench", "--out", "{tmp}/out"],
    ["bench-ffn"],
    ["build-trt", "--out", "{tmp}/out"],
    ["evaluate", "--json", "{tmp}/out"],
], ids=lambda argv: argv[0])
def test_ctrl_c_in_any_command_is_one_line_and_status_130(argv, tmp_path, monkeypatch, capsys):
    """Ctrl-C where the work starts (the model load; bench-ffn's measurement): no traceback, nothing written."""
    from flashu_compile.backends import tensorrt
    from flashu_compile.tools import bench_ffn

    monkeypatch.setattr(common, "load_model", _interrupt)
    monkeypatch.setattr(bench_ffn, "run", _interrupt)
    monkeypatch.setattr(tensorrt, "tensorrt_unavailable_reason", lambda: None)  # build-trt gets as far as the load
    assert main([arg.format(tmp=tmp_path) for arg in argv]) == 130
    assert capsys.readouterr().err == "interrupted\n"
    assert list(tmp_path.iterdir()) == []


def test_a_compile_error_is_shown_as_the_backend_raised_it(monkeypatch, capsys):
    """dynamo wraps what a backend raises; a user's error inside is reported by its own message, a bug is not."""
    from torch._dynamo.exc import BackendCompilerFailed

    def compile_fails(error: Exception):
        def load(args):
            raise BackendCompilerFailed(lambda: None, error, None)
        return load

    monkeypatch.setattr(common, "load_model", compile_fails(OSError("debug_dir /x is read-only")))
    assert main(["demo"]) == 2
    assert capsys.readouterr().err == "flashu-compile demo: error: debug_dir /x is read-only\n"
    monkeypatch.setattr(common, "load_model", compile_fails(KeyError("a bug")))
    with pytest.raises(BackendCompilerFailed):
        main(["demo"])


def test_the_demo_compares_eager_and_compiled_and_draws_both(tmp_path, capsys):
    from PIL import Image

    assert main(["demo", "--steps", "4", "--lowering", "eager", "--out", str(tmp_path / "out"), "--no-progress",
                 "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"flashu fast \(eager\): [\d.]+ s/image, [\d.]+ GFLOP/image .*: [\d.]+x faster", out), out
    assert re.search(r"eager: +[\d.]+ s/image, [\d.]+ GFLOP/image", out) and "what the compiler did" in out
    assert re.search(r"1\. t2i +3 calls", out), out  # the compiler's summary of the request
    assert len(re.findall(r"A: '", out)) == 2  # the answer both ways
    with Image.open(tmp_path / "out" / "t2i.png") as picture:
        assert picture.height == 2 * picture.width  # one prompt: the eager image above the compiled one


@pytest.mark.parametrize("command", ["demo", "ask"])
def test_a_file_that_is_not_cache_artifacts_is_refused_before_the_model_loads(command, tmp_path, no_model, capsys):
    junk = tmp_path / "caches.bin"
    junk.write_bytes(b"not a mega-cache")
    err = run([command, "--cache-artifacts", str(junk)], capsys)
    assert "--cache-artifacts" in err and "holds no PyTorch cache artifacts" in err, err
    assert junk.read_bytes() == b"not a mega-cache"  # left as it was


def test_the_eager_demo_says_it_has_no_compile_caches_to_write(tmp_path, capsys):
    from torch.compiler._cache import CacheArtifactManager

    # As in a new process: what earlier tests compiled in this one would otherwise be saved too.
    CacheArtifactManager.clear()
    caches = tmp_path / "caches.bin"
    assert main(["demo", "--steps", "3", "--lowering", "eager", "--out", str(tmp_path / "out"), "--no-progress",
                 "--max-new-tokens", "1", "--cache-artifacts", str(caches)]) == 0
    assert "nothing compiled to a cache" in capsys.readouterr().out and not caches.exists()
