"""fedpara.storage: a file is replaced whole or not at all."""

from __future__ import annotations

import os
import stat

import pytest

from fedpara.storage import write_atomic


def test_bytes_or_a_writer_replace_the_file_whole(tmp_path):
    path = tmp_path / "new" / "folder" / "x.json"
    write_atomic(path, b"first")
    assert path.read_bytes() == b"first"
    write_atomic(path, lambda f: f.write(b"second"))  # streamed
    assert path.read_bytes() == b"second"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # readable by others, as plain writes are
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"old")

    def half_then_fail(f):
        f.write(b"half of the n")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_the_file_and_then_its_folder_are_flushed_to_disk(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def record(fd):
        mode = os.fstat(fd).st_mode
        synced.append("folder" if stat.S_ISDIR(mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    write_atomic(tmp_path / "x.json", b"{}")
    assert synced == ["file", "folder"]  # the contents first, then the new name
