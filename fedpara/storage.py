"""Writing a file so that a reader sees the old file or the new one, never half of one.

    from fedpara.storage import write_atomic
    write_atomic(path, b"...")                           # bytes
    write_atomic(path, lambda f: np.savez(f, **arrays))  # or a function writing to a binary file

Also `check_writable(folder, what)`: whether a run can write there, asked before the run.

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


class NotWritableError(OSError):
    """A folder a run will write to cannot be made or written (found before the run starts)."""


def make_folder(folder: str | os.PathLike, what: str) -> Path:
    """`folder`, made with its parents if missing; else NotWritableError naming `what` (the
    setting that chose the folder) and the reason, e.g. a file where a folder should be."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _not_writable(folder, what, err) from err
    return folder


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """Whether files can be written in `folder`, so that a long run finds out now, not when it
    saves: a file is created and removed in it, or, if it is missing (it is then made by the
    write), in the nearest folder above it that exists. Nothing is left behind; else
    NotWritableError as `make_folder`."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path.cwd())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a folder")
        with tempfile.TemporaryFile(dir=existing, prefix=".write-check-"):
            pass
    except OSError as err:
        raise _not_writable(folder, what, err) from err


def _not_writable(folder: Path, what: str, err: OSError) -> NotWritableError:
    blocking = next((p for p in (folder, *folder.parents) if p.exists()), None)
    reason = (f"{blocking} is a file, not a folder" if blocking is not None
              and not blocking.is_dir() else err.strerror or str(err))
    return NotWritableError(
        f"{what}={str(folder)!r} cannot be written: {reason}.\nTo fix it: choose a folder that "
        f"exists or can be made, and can be written.")


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
