"""What indexing a dataset yields (`Record`, `Dataset`) and how its splits are drawn and repaired.

Every split is deterministic: same inputs and seed give the same splits in every process
(per-class generators are seeded from the seed and a CRC32 of the class name, never from
Python's salted ``hash``). Nothing here touches the file system.
"""

from __future__ import annotations

import math
import numbers
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from featpipe.errors import DatasetError
from featpipe.names import SPLITS


@dataclass(frozen=True)
class Record:
    """One clip: where it is, its unique key, its class and its split."""

    path: Path  # absolute path to the clip file
    video: str  # path relative to the dataset root, POSIX separators; unique within a Dataset
    label: str  # class name
    split: str  # one of SPLITS


@dataclass(frozen=True)
class Dataset:
    """An indexed dataset: records sorted by ``video``, classes sorted by name."""

    root: Path
    layout: str
    class_names: tuple[str, ...]
    records: tuple[Record, ...]
    # how the splits were made: "drawn" (a seeded stratified split over the index: class folders, a CSV
    # without a split column), "given" (split folders, a CSV split column) or "lists" (UCF101)
    split_source: str = "given"
    split_params: tuple = ()  # (val_fraction, test_fraction, seed) of a drawn split
    # (folder, why) for each folder under a class folder that could not be read: its clips are not in
    # ``records`` (its class is kept in ``class_names``, even with no clip); extract reports them
    unreadable: tuple[tuple[Path, str], ...] = ()

    def label_index(self, label: str) -> int:
        """Position of ``label`` in ``class_names`` (the integer target a model is trained on)."""
        try:
            return self.class_names.index(label)
        except ValueError:
            raise DatasetError(
                f"Class {label!r} is not one of this dataset's {len(self.class_names)} classes "
                f"({preview(self.class_names)}); check the label or re-index the dataset."
            ) from None

    def counts(self) -> dict[str, dict[str, int]]:
        """``split -> class -> number of clips``; only splits with clips, every class listed in each."""
        table: dict[str, dict[str, int]] = {}
        for split in SPLITS:
            in_split = [r for r in self.records if r.split == split]
            if not in_split:
                continue
            per_class = {name: 0 for name in self.class_names}
            for record in in_split:
                per_class[record.label] = per_class.get(record.label, 0) + 1
            table[split] = per_class
        return table


# --------------------------------------------------------------------------------------------
# the split


def stratified_split(
    keys: Sequence[str],
    labels: Sequence[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    groups: Sequence[str] | None = None,
) -> list[str]:
    """Assign a split name to each key, per class, seeded and independent of input order.

    Per class the units (keys, or groups when ``groups`` is given; a group is taken within its
    class) are sorted, shuffled with ``numpy.random.default_rng([seed, crc32(class)])``, and the
    first ``round(n * test_fraction)`` go to test, the next ``round(n * val_fraction)`` to val
    (halves round up), the rest to train. A class with at least three units gets at least one
    val and one test unit when the fraction is above zero; every class keeps at least one
    train unit, so a class with one clip goes entirely to train. All keys of a group share a split.
    """
    keys = [str(k) for k in keys]
    labels = [str(label) for label in labels]
    if len(labels) != len(keys):
        raise ValueError(f"stratified_split got {len(keys)} keys but {len(labels)} labels")
    if groups is not None:
        groups = [str(g) for g in groups]
        if len(groups) != len(keys):
            raise ValueError(f"stratified_split got {len(keys)} keys but {len(groups)} groups")
    if len(set(keys)) != len(keys):
        raise ValueError("stratified_split keys must be unique")
    check_fractions(val_fraction, test_fraction)
    check_seed(seed)

    # label -> unit -> indices of keys in that unit
    units: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, (key, label) in enumerate(zip(keys, labels)):
        units[label][groups[i] if groups is not None else key].append(i)

    result = ["train"] * len(keys)
    for label in sorted(units):
        names = sorted(units[label])
        rng = np.random.default_rng([int(seed), zlib.crc32(label.encode("utf-8"))])
        shuffled = [names[j] for j in rng.permutation(len(names))]
        n_test, n_val = _split_sizes(len(names), val_fraction, test_fraction)
        for position, unit in enumerate(shuffled):
            split = "test" if position < n_test else "val" if position < n_test + n_val else "train"
            for i in units[label][unit]:
                result[i] = split
    return result


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


def _split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(n_test, n_val) for a class of ``n`` units, leaving at least one train unit."""
    n_test = _round_half_up(n * test_fraction)
    n_val = _round_half_up(n * val_fraction)
    if n >= 3:
        if test_fraction > 0:
            n_test = max(n_test, 1)
        if val_fraction > 0:
            n_val = max(n_val, 1)
    # keep at least one train unit: trim the larger held-out part first (val on a tie)
    while n_test + n_val > max(n - 1, 0):
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    return n_test, n_val


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise DatasetError(f"{name} must be a number between 0 and 1, got {value!r}; pass e.g. 0.15.")
        if value < 0:
            raise DatasetError(f"{name} must be at least 0, got {value!r}; pass e.g. 0.15 (or 0 for no such split).")
    if val_fraction + test_fraction >= 1:
        raise DatasetError(
            f"val_fraction + test_fraction must be below 1 so some clips are left to train on, "
            f"got {val_fraction!r} + {test_fraction!r}; lower one of them (e.g. 0.15 each)."
        )


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise DatasetError(f"seed must be a non-negative integer, got {seed!r}; pass e.g. 1337.")


def check_fold(fold: int) -> None:
    if isinstance(fold, bool) or not isinstance(fold, numbers.Integral) or int(fold) not in (1, 2, 3):
        raise DatasetError(f"UCF101 fold must be 1, 2 or 3, got {fold!r}; pass --fold 1, 2 or 3.")


@dataclass(frozen=True)
class SplitRepair:
    """Splits for the clips that could be used, and what could not be made whole."""

    splits: dict[str, str]  # clip key -> split, for every usable clip
    redrawn: tuple[str, ...]  # classes whose split was drawn again over their usable clips
    warnings: tuple[str, ...]  # one sentence per class left without clips in a split


def repair_splits(dataset: Dataset, usable) -> SplitRepair:
    """Make "every class in every split" hold for the ``usable`` clips (those that decoded).

    A drawn split (class folders, a CSV without a split column) is drawn before decoding, so
    broken clips can empty a class's val or test share. Each class that lost a split is drawn
    again, with the same fractions and seed, over its usable clips only; the other classes keep
    their split. What cannot be repaired (a class with fewer than three usable clips; given
    splits -- split folders, a CSV split column, UCF101 lists -- are never moved) becomes a warning.
    Splits a dataset does not use (``val_fraction`` 0, no ``test/`` folder) are not required.
    """
    usable = set(usable)
    records = [r for r in dataset.records if r.video in usable]
    splits = {r.video: r.split for r in records}
    if dataset.split_source == "drawn":
        val_fraction, test_fraction, seed = dataset.split_params
        required = ["train"] + (["val"] if val_fraction > 0 else []) + (["test"] if test_fraction > 0 else [])
    else:
        required = [s for s in SPLITS if any(r.split == s for r in dataset.records)]
    by_class: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_class[r.label].append(r)
    redrawn, warnings = [], []
    for name in dataset.class_names:
        clips = by_class.get(name, [])
        if not clips:
            if any(r.label == name for r in dataset.records):
                warnings.append(f"class '{name}' has no usable clip at all (every one failed to decode).")
            continue
        missing = [s for s in required if not any(splits[r.video] == s for r in clips)]
        if missing and dataset.split_source == "drawn":
            keys = [r.video for r in clips]
            drawn = dict(zip(keys, stratified_split(keys, [name] * len(keys), val_fraction, test_fraction, seed)))
            still = [s for s in required if s not in drawn.values()]
            if len(still) < len(missing):  # the redraw gives the class a split it had lost
                splits.update(drawn)
                redrawn.append(name)
                missing = still
            if missing:
                warnings.append(
                    f"class '{name}' has only {len(clips)} usable clip(s), so it has no {' or '.join(missing)} clip."
                )
        elif missing:
            warnings.append(
                f"class '{name}' has no usable clip in the {' or '.join(missing)} split "
                f"({dataset.layout} splits are given, so featpipe does not move clips)."
            )
    return SplitRepair(splits, tuple(redrawn), tuple(warnings))


def preview(items: Sequence[str], limit: int = 8) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")
