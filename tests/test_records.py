"""featpipe.video.records: deterministic stratified/group-aware splits, and their repair after decoding."""

from __future__ import annotations

from collections import Counter

import pytest

from dataset_trees import class_tree, touch
from featpipe.errors import DatasetError
from featpipe.names import SPLITS
from featpipe.video.datasets import index_dataset
from featpipe.video.records import repair_splits, stratified_split

# ------------------------------------------------------------------------------------------------
# stratified_split (pure)


def test_stratified_split_function_ignores_input_order():
    keys = [f"k{i:02d}" for i in range(24)]
    labels = ["x" if i % 2 else "y" for i in range(24)]
    forward = dict(zip(keys, stratified_split(keys, labels, 0.2, 0.2, seed=3)))
    backward = dict(zip(keys[::-1], stratified_split(keys[::-1], labels[::-1], 0.2, 0.2, seed=3)))
    assert forward == backward
    assert Counter((labels[i], forward[k]) for i, k in enumerate(keys)) == Counter(
        {("x", "train"): 8, ("x", "val"): 2, ("x", "test"): 2, ("y", "train"): 8, ("y", "val"): 2, ("y", "test"): 2}
    )


def test_stratified_split_rounds_halves_up_and_keeps_one_train_clip():
    def sizes(n, val, test):
        result = stratified_split([f"k{i}" for i in range(n)], ["x"] * n, val, test, seed=0)
        return tuple(result.count(s) for s in SPLITS)

    assert sizes(25, 0.1, 0.1) == (19, 3, 3)  # 2.5 -> 3, not banker's 2
    assert sizes(3, 0.15, 0.15) == (1, 1, 1)  # at least one val and one test from 3 clips
    assert sizes(2, 0.15, 0.15) == (2, 0, 0)  # fewer than 3 clips: nothing forced out
    assert sizes(2, 0.0, 0.6) == (1, 0, 1)
    assert sizes(3, 0.3, 0.6) == (1, 1, 1)  # 0.9->1 val, 1.8->2 test, trimmed to keep a train clip
    assert sizes(1, 0.45, 0.45) == (1, 0, 0)


def test_stratified_split_with_groups_keeps_each_group_in_one_split():
    keys, labels, groups = [], [], []
    for label in ("p", "q"):
        for g in range(10):
            for c in range(4):
                keys.append(f"{label}/g{g}_c{c}")
                labels.append(label)
                groups.append(f"{label}/g{g}")
    result = stratified_split(keys, labels, 0.2, 0.1, seed=5, groups=groups)
    per_group: dict[str, set[str]] = {}
    for g, s in zip(groups, result):
        per_group.setdefault(g, set()).add(s)
    assert all(len(s) == 1 for s in per_group.values())
    # 10 groups per class: 2 val groups, 1 test group, 7 train groups (4 clips each)
    assert Counter(zip(labels, result)) == Counter(
        {("p", "train"): 28, ("p", "val"): 8, ("p", "test"): 4, ("q", "train"): 28, ("q", "val"): 8, ("q", "test"): 4}
    )


def test_stratified_split_rejects_bad_fractions():
    with pytest.raises(DatasetError, match="must be below 1"):
        stratified_split(["a", "b"], ["x", "y"], 0.5, 0.5, seed=1)


# --------------------------------------------------------------------------------------------
# split repair after decoding


def test_a_class_whose_val_clips_all_failed_gets_a_redrawn_split_over_its_usable_clips(tmp_path):
    ds = index_dataset(class_tree(tmp_path / "d", {"a": 8, "b": 8}))
    assert ds.split_source == "drawn"
    val_a = {r.video for r in ds.records if r.label == "a" and r.split == "val"}
    usable = [r.video for r in ds.records if r.video not in val_a]
    repair = repair_splits(ds, usable)
    assert set(repair.splits) == set(usable)
    for label in ("a", "b"):
        got = {repair.splits[r.video] for r in ds.records if r.label == label and r.video in repair.splits}
        assert got == {"train", "val", "test"}, label
    assert repair.redrawn == ("a",) and repair.warnings == ()
    untouched = {r.video: r.split for r in ds.records if r.label == "b"}
    assert all(repair.splits[k] == v for k, v in untouched.items()), "other classes keep their split"


def test_what_cannot_be_repaired_is_a_warning_naming_the_class_and_split(tmp_path):
    ds = index_dataset(class_tree(tmp_path / "d", {"a": 8, "b": 8, "c": 4}))
    usable = [r.video for r in ds.records if r.label != "c"][:-1] + [r.video for r in ds.records if r.label == "c"][:2]
    repair = repair_splits(ds, usable)
    assert len(repair.warnings) == 1
    assert repair.warnings[0].startswith("class 'c' has only 2 usable clip(s), so it has no ")
    assert repair.warnings[0].endswith("test clip."), "with 2 clips a class keeps one train clip: no test clip"

    given = tmp_path / "given"
    touch(given, "train/a/1.mp4", "train/b/2.mp4", "val/a/3.mp4", "val/b/4.mp4")
    ds = index_dataset(given)
    repair = repair_splits(ds, ["train/a/1.mp4", "train/b/2.mp4", "val/a/3.mp4"])
    assert repair.splits == {"train/a/1.mp4": "train", "train/b/2.mp4": "train", "val/a/3.mp4": "val"}
    assert len(repair.warnings) == 1 and "class 'b' has no usable clip in the val split" in repair.warnings[0]
