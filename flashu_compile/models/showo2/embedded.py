"""The embedded default model: a small Show-o2 trained on the synthetic scenes, shipped in the package."""

from __future__ import annotations

import warnings
from pathlib import Path

from ...files import sha256_file

WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights" / "showo2-scenes"
CHECKSUMS = "SHA256SUMS"


def verify_checksums(folder: Path) -> None:
    """Compare every file listed in ``SHA256SUMS`` with its digest; raise naming the first mismatch."""
    from .checkpoint import CheckpointError

    listing = folder / CHECKSUMS
    if not listing.is_file():
        raise CheckpointError(f"{listing} is missing: the embedded weights cannot be verified")
    for line in listing.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        file = folder / name.strip().lstrip("*")
        if not file.is_file():
            raise CheckpointError(f"embedded weight file {file} is missing")
        actual = sha256_file(file)
        if actual != digest:
            raise CheckpointError(f"checksum mismatch for {file}: expected {digest}, got {actual}")


def load_default():
    """The shipped trained model, checksum-verified; the seeded ``tiny`` preset if none is shipped."""
    from .checkpoint import load_showo2
    from .modeling import Showo2

    if not (WEIGHTS_DIR / "config.json").is_file():
        warnings.warn(
            f"no trained embedded weights at {WEIGHTS_DIR}; using the randomly initialised 'tiny' preset "
            "(outputs are not meaningful images or answers)",
            stacklevel=2,
        )
        return Showo2.from_preset("tiny")
    verify_checksums(WEIGHTS_DIR)
    return load_showo2(WEIGHTS_DIR)
