"""files: atomic writes and whole-folder replacement with normal permissions, fsync and no leftovers."""

import os
import stat

import pytest

import flashu_compile.files as files
from flashu_compile.files import read_checksums, replacing_dir, write_atomic, write_checksums


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


@pytest.fixture
def fsynced(monkeypatch):
    """The paths fsynced, in order (directories as well as files)."""
    seen = []
    real = os.fsync

    def record(fd):
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(files.os, "fsync", record)
    return seen


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_atomic_respects_the_umask_and_fsyncs(tmp_path, umask_027, fsynced):
    target = tmp_path / "out.txt"
    write_atomic(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new"
    assert _mode(target) == 0o640  # 0o666 & ~0o027, as open() gives; not mkstemp's 0o600
    # The data under its temporary name before the rename, then the folder holding the rename.
    assert fsynced[0].startswith(str(tmp_path / ".out.txt.partial-")) and fsynced[-1] == str(tmp_path)
    assert os.listdir(tmp_path) == ["out.txt"]


def test_write_atomic_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, fail)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]


def test_replacing_dir_swaps_the_whole_folder(tmp_path, umask_027, fsynced):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "stale-shard.bin").write_text("old")
    with replacing_dir(target) as new:
        (new / "sub").mkdir()
        (new / "sub" / "a.json").write_text("{}")
        (new / "b.bin").write_text("b")
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["b.bin", "sub", "sub/a.json"]
    assert _mode(target) == 0o750 and _mode(target / "b.bin") == 0o640
    # Every file and folder before the swap, then the parent holding the swap.
    assert {os.path.basename(p) for p in fsynced[:-1]} >= {"b.bin", "a.json", "sub"} and fsynced[-1] == str(tmp_path)
    assert os.listdir(tmp_path) == ["ckpt"]  # neither the new nor the old folder is left beside it


def test_replacing_dir_failure_keeps_the_old_folder(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "x").write_text("old")
    with pytest.raises(RuntimeError, match="boom"), replacing_dir(target) as new:
        (new / "x").write_text("new")
        raise RuntimeError("boom")
    assert (target / "x").read_text() == "old" and os.listdir(tmp_path) == ["ckpt"]


def test_checksums_round_trip(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"abc")
    (tmp_path / "g").write_bytes(b"")
    assert read_checksums(tmp_path) is None
    write_checksums(tmp_path)
    listed = read_checksums(tmp_path)
    assert listed == {"d/f": files.sha256_file(tmp_path / "d" / "f"), "g": files.sha256_file(tmp_path / "g")}
    (tmp_path / "SHA256SUMS").write_text("0" * 64 + "  ../escape\n")
    with pytest.raises(ValueError, match="line 1"):
        read_checksums(tmp_path)
