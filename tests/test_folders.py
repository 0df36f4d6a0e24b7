"""featpipe.video.folders: folders that cannot be read are reported, and the walk ends on link loops."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dataset_trees import class_tree, touch
from featpipe.errors import DatasetError
from featpipe.video.datasets import index_dataset

# ------------------------------------------------------------------------- permissions
# As root, chmod does not deny reads: a fault-injection wrapper around os.scandir / os.listdir
# denies listing one folder instead, as the kernel does for a folder without read permission.


def deny_listing(monkeypatch, denied: Path) -> None:
    real_scandir, real_listdir = os.scandir, os.listdir

    def check(path):
        if path is not None and Path(os.fsdecode(path)) == denied:
            raise PermissionError(13, "Permission denied", os.fsdecode(path))

    def fake_scandir(path="."):
        check(path)
        return real_scandir(path)

    def fake_listdir(path="."):
        check(path)
        return real_listdir(path)

    monkeypatch.setattr(os, "scandir", fake_scandir)
    monkeypatch.setattr(os, "listdir", fake_listdir)


@pytest.mark.parametrize("layout", ["class_folders", "split_folders"])
def test_a_class_folder_without_read_permission_is_reported_and_its_class_kept(tmp_path, monkeypatch, layout):
    """Indexing goes on past it (extract reports it, as it does a bad clip); the class stays known, so the
    cache written now still takes the clips once the folder is readable."""
    if layout == "class_folders":
        root = class_tree(tmp_path / "data", {"cats": 4, "dogs": 4, "owls": 4})
        denied = root / "owls"
    else:
        root = tmp_path / "data"
        touch(
            root,
            *(
                f"{s}/{c}/{c}{i}.mp4"
                for s in ("train", "val", "test")
                for c in ("cats", "dogs", "owls")
                for i in range(2)
            ),
        )
        denied = root / "train" / "owls"
    deny_listing(monkeypatch, denied)
    ds = index_dataset(root)
    assert ds.unreadable == ((denied, "permission denied"),)
    assert ds.class_names == ("cats", "dogs", "owls")
    assert len(ds.records) == (8 if layout == "class_folders" else 16)
    assert not any(r.video.startswith(f"{denied.relative_to(root).as_posix()}/") for r in ds.records)


def test_a_split_folder_without_read_permission_is_one_sentence(tmp_path, monkeypatch):
    root = tmp_path / "data"
    touch(root, *(f"{s}/{c}/{c}{i}.mp4" for s in ("train", "val", "test") for c in ("cats", "dogs") for i in range(2)))
    deny_listing(monkeypatch, root / "val")
    with pytest.raises(DatasetError, match="permission denied"):
        index_dataset(root)


def test_a_folder_that_can_be_listed_but_not_entered_is_reported_and_a_link_loop_ends(tmp_path, monkeypatch):
    """Read without execute permission: its names are listed, but no file in it can be opened (not even stat)."""
    from featpipe.video.folders import walk_clips

    root = class_tree(tmp_path / "data", {"cats": 2, "dogs": 2})
    touch(root, "dogs/locked/x.mp4", "dogs/locked/y.mp4")
    (root / "cats" / "loop").symlink_to(root / "cats")
    locked = root / "dogs" / "locked"
    real_lstat = os.lstat

    def lstat(path, *args, **kwargs):
        if Path(os.fsdecode(path)).parent == locked:
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", lstat)
    found = walk_clips(root)
    assert [p.relative_to(root).as_posix() for p in found.clips] == [
        "cats/cats_000.mp4",
        "cats/cats_001.mp4",
        "dogs/dogs_000.mp4",
        "dogs/dogs_001.mp4",
    ]
    assert found.unreadable == ((locked, "permission denied"),)
    ds = index_dataset(root)
    assert ds.unreadable == ((locked, "permission denied"),) and len(ds.records) == 4
