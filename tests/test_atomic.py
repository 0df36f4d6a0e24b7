"""The one atomic-write helper: a failed write leaves the old file and no temporary; a finished one replaces it."""

from __future__ import annotations

import os

import pytest

from featpipe.runtime import atomic
from featpipe.runtime.atomic import atomic_path, write_bytes, write_text


def test_a_failure_inside_the_write_leaves_the_old_file_intact_and_no_temporary(tmp_path):
    dest = tmp_path / "leaderboard.csv"
    dest.write_text("old\n")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_path(dest) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("disk on fire")
    assert dest.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["leaderboard.csv"]


def test_ctrl_c_inside_the_write_leaves_no_temporary_and_no_destination(tmp_path):
    dest = tmp_path / "model.keras"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(dest, tmp=tmp_path / "staged-model.keras") as tmp:
            tmp.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_failed_rename_leaves_the_old_file_and_removes_the_temporary(tmp_path):
    dest = tmp_path / "folder"
    dest.mkdir()  # a file cannot replace a folder
    with pytest.raises(OSError):
        write_text(dest, "new")
    assert dest.is_dir() and list(tmp_path.iterdir()) == [dest]


def test_success_replaces_the_file_whole_fsyncs_it_and_its_folder_and_leaves_no_temporary(tmp_path, monkeypatch):
    dest = tmp_path / "latest"
    dest.write_text("run-1\n")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    with atomic_path(dest) as tmp:
        assert tmp.parent == dest.parent and tmp != dest
        tmp.write_text("run-2\n")
        assert dest.read_text() == "run-1\n", "the destination is untouched until the block ends"
    assert dest.read_text() == "run-2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]
    assert synced == [str(tmp), str(tmp_path)], "the file before its rename, then the folder"
    assert write_bytes(dest, b"run-3\n", tmp=tmp_path / "latest.new") == dest and dest.read_bytes() == b"run-3\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_install_puts_a_file_written_elsewhere_in_place(tmp_path):
    staged, dest = tmp_path / "staged.keras", tmp_path / "model.keras"
    staged.write_bytes(b"weights")
    dest.write_bytes(b"old weights")
    atomic.install(staged, dest)
    assert dest.read_bytes() == b"weights" and not staged.exists()
