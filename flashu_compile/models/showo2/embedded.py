"""The embedded models' folders: small Show-o2s trained on the synthetic scenes, shipped in the package.

``Showo2.default()`` loads the default one, ``Showo2.embedded(name)`` any of them; this module knows the
folders and checks them, not the model class.
"""

from __future__ import annotations

from pathlib import Path

from ...files import sha256_file
from .checkpoint import CheckpointError

WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights" / "showo2-scenes"
# Embedded model name -> its folder. "scenes" (4 LLM layers) is the default: every test and the demo run it in
# seconds. "scenes-10" (10 LLM layers) is the one on which every technique of the paper preset acts (skip_ratio
# 0.2 skips two layers, token_drop_layer 2 leaves seven after the drop): research/scenes/TRAINING.md, run 10f.
EMBEDDED = {"scenes": WEIGHTS_DIR, "scenes-10": WEIGHTS_DIR.with_name("showo2-scenes-10")}
CHECKSUMS = "SHA256SUMS"


def verify_checksums(folder: Path) -> None:
    """Compare every file listed in ``SHA256SUMS`` with its digest; raise naming the first mismatch."""
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
