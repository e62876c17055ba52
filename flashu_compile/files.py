"""File helpers shared by everything the project writes or verifies: atomic writes, whole-folder
replacement, content digests and ``SHA256SUMS`` listings.

Every file the project writes goes through :func:`write_atomic` (one file) or :func:`replacing_dir`
(a folder of files). Both create files and folders with the permissions a plain ``open()`` or
``mkdir()`` gives (``0o666`` / ``0o777`` less the umask), flush the data to disk before it becomes
visible under its final name, and leave nothing behind on failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

CHECKSUMS = "SHA256SUMS"


def _fsync_dir(folder: Path) -> None:
    """Make the entries of ``folder`` (renames, new files) durable; POSIX only, a no-op elsewhere."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sibling(path: Path, tag: str, create: Callable[[Path], None]) -> Path:
    """Create (with ``create``) a new entry with a unique hidden name next to ``path``."""
    while True:
        candidate = path.parent / f".{path.name}.{tag}-{secrets.token_hex(6)}"
        try:
            create(candidate)
            return candidate
        except FileExistsError:
            continue


def _create_file(path: Path) -> None:
    # Mode 0o666 as open() uses, so the umask decides the permissions (mkstemp would give 0o600).
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` fills a new file next to ``path``, which then replaces ``path`` in one step.

    The new file has the permissions a plain ``open()`` gives and is on disk (file and directory
    entry fsynced) before the call returns. A failure leaves ``path`` as it was and no temporary
    file behind, so a reader never sees a half-written checkpoint, plan, engine or image.
    """
    path = Path(path)
    tmp = _sibling(path, "partial", _create_file)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def replacing_dir(target: Path) -> Iterator[Path]:
    """Yield a new, empty folder next to ``target``; once the block succeeds it replaces ``target`` whole.

    Whatever ``target`` held before is gone afterwards (so no stale file of an earlier version can
    be read with the new ones); callers decide beforehand whether ``target`` may be replaced at all.
    Every file is fsynced before the swap. An error inside the block (or in the swap) leaves
    ``target`` as it was and removes the new folder. POSIX cannot rename a folder over a non-empty
    one, so the old folder is first renamed aside to a hidden sibling and deleted once the new one
    is in place; only a crash between those two renames leaves ``target`` missing, with the old
    version intact in that sibling.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    new = _sibling(target, "new", os.mkdir)
    try:
        yield new
        for root, _, names in os.walk(new):
            for name in names:
                _fsync_file(Path(root, name))
            _fsync_dir(Path(root))
        if not target.exists():
            os.replace(new, target)
        else:
            old = _sibling(target, "old", os.mkdir)
            os.rmdir(old)  # only the unique name is wanted
            os.replace(target, old)
            try:
                os.replace(new, target)
            except BaseException:
                os.replace(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    _fsync_dir(target.parent)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(folder: Path) -> None:
    """Write ``folder/SHA256SUMS`` (``sha256sum`` format) listing every other file under ``folder``."""
    lines = [f"{sha256_file(f)}  {f.relative_to(folder).as_posix()}"
             for f in sorted(Path(folder).rglob("*")) if f.is_file() and f.name != CHECKSUMS]
    write_atomic(Path(folder) / CHECKSUMS, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))


def read_checksums(folder: Path) -> dict[str, str] | None:
    """``{relative name: hex digest}`` from ``folder/SHA256SUMS``, or None if there is none.

    Raises ValueError naming the listing if a line is not ``<64 hex digits>  <relative name>``.
    """
    listing = Path(folder) / CHECKSUMS
    if not listing.is_file():
        return None
    try:
        text = listing.read_text()
    except UnicodeDecodeError as err:
        raise ValueError(f"{listing} is not text: {err}") from err
    out = {}
    for number, line in enumerate(text.splitlines(), 1):
        digest, _, name = line.partition(" ")
        name = name.strip().removeprefix("*")  # sha256sum marks binary mode with '*'
        if (len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not name
                or Path(name).is_absolute() or ".." in Path(name).parts):
            raise ValueError(f"{listing}, line {number}: expected '<sha256>  <relative file name>', got {line!r}")
        out[name] = digest
    return out
