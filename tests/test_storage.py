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


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])  # Ctrl-C too
def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path, error):
    path = tmp_path / "x.bin"
    path.write_bytes(b"old")

    def half_then_fail(f):
        f.write(b"half of the n")
        raise error

    with pytest.raises(type(error)):
        write_atomic(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_the_file_is_on_disk_before_it_replaces_the_old_one_then_its_folder(tmp_path,
                                                                           monkeypatch):
    calls = []
    fsync, replace = os.fsync, os.replace

    def record_fsync(fd):
        calls.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), replace(a, b))[1])
    write_atomic(tmp_path / "x.json", b"{}")
    # the contents reach the disk first, then the rename, then the folder's new entry
    assert calls == ["fsync file", "replace", "fsync folder"]


def test_a_folder_is_checked_for_writing_without_leaving_anything(tmp_path):
    from fedpara.storage import NotWritableError, check_writable, make_folder

    check_writable(tmp_path / "a" / "b", "results_dir")  # missing: its nearest folder is checked
    assert list(tmp_path.iterdir()) == []  # nothing made, nothing left
    (tmp_path / "file").write_text("")
    for folder in (tmp_path / "file", tmp_path / "file" / "below"):
        with pytest.raises(NotWritableError, match=f"results_dir='{folder}' cannot be written: "
                                                   f"{tmp_path / 'file'} is a file, not a "
                                                   f"folder.\nTo fix it"):
            check_writable(folder, "results_dir")
        with pytest.raises(NotWritableError, match="data_dir=.*is a file, not a folder"):
            make_folder(folder, "data_dir")
    assert make_folder(tmp_path / "c" / "d", "data_dir").is_dir()
