"""Writing a file so that a reader sees the old file or the new one, never half of one.

    from fedpara.storage import write_atomic
    write_atomic(path, b"...")                           # bytes
    write_atomic(path, lambda f: np.savez(f, **arrays))  # or a function writing to a binary file

The one place fedpara writes files that other code reads back (histories, checkpoints, decompressed
datasets, caches, benchmark records). Imports only the standard library.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], object]) -> None:
    """Write `data` to `path` through a temporary file in the same folder, then `os.replace`.

    `data`: the bytes, or a function called with the open binary file (to stream large output).
    The temporary file is flushed to disk before it replaces `path`, and the folder after it (so
    the new name survives a power cut, not only the contents); on any error the temporary file is
    removed and `path` is left as it was. Missing parent folders are created; the file gets mode
    0o644.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Flush a folder's entries to disk (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # Windows cannot open a folder this way
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
