from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def write_fails_midway(monkeypatch) -> Callable[[str, BaseException], None]:
    """``arm(name, error)``: writing a file called ``name`` (or a temporary file for it) stops halfway with
    ``error``, as a full disk (OSError) or a Ctrl-C (KeyboardInterrupt) would stop it; other files are written."""
    def arm(name: str, error: BaseException) -> None:
        write_text = Path.write_text

        def write(self: Path, data: str, *args, **kwargs) -> int:
            if self.name == name or self.name.startswith(f".{name}."):  # the file, or files.write_atomic's sibling
                write_text(self, data[:len(data) // 2], *args, **kwargs)
                raise error
            return write_text(self, data, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write)

    return arm
