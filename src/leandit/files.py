"""Writing files so that a crash or Ctrl-C never leaves a half-written one behind: write a
temporary file beside the target, then rename it over the target (atomic on one filesystem)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, IO


def write_atomically(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call `write(file)` on a temporary file next to `path`, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    return write_atomically(path, lambda f: f.write(text.encode()))


def savez_atomically(path: str | os.PathLike, **arrays) -> Path:
    """numpy.savez into `path` (the name is kept as given: no ".npz" is appended)."""
    import numpy as np

    return write_atomically(path, lambda f: np.savez(f, **arrays))
