"""Index a video dataset into ``Record`` s: which clip, which class, which split.

Pure bookkeeping: nothing here opens a video. Four layouts are understood, detected in this
order (an explicit ``csv`` argument wins over everything):

``ucf101``
    ``classInd.txt`` + ``trainlistNN.txt`` + ``testlistNN.txt`` (in DIR or DIR/ucfTrainTestlist),
    videos under DIR, DIR/UCF-101 or DIR/UCF101. The train list is split into train/val by whole
    ``_gNN_`` groups so clips cut from one long video never straddle train and val.
``split-folders``
    ``DIR/{train,val,test}/<class>/<clip>`` (any non-empty subset of the split folders).
``class-folders``
    ``DIR/<class>/<clip>``, split by a seeded stratified split.
``csv``
    a CSV with ``video_name,tag`` (and optionally ``split``), paths relative to the CSV's folder.

Every split is deterministic: same inputs and seed give the same splits in every process
(per-class generators are seeded from the seed and a CRC32 of the class name, never from
Python's salted ``hash``).
"""

from __future__ import annotations

import math
import numbers
import os
import re
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from featpipe.errors import DatasetError
from featpipe.names import SPLITS

__all__ = [
    "VIDEO_EXTENSIONS",
    "SPLITS",
    "LAYOUTS",
    "Record",
    "Dataset",
    "FolderClips",
    "index_dataset",
    "walk_clips",
    "unreadable_note",
    "stratified_split",
    "repair_splits",
]

VIDEO_EXTENSIONS: frozenset[str] = frozenset({".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg"})
LAYOUTS = ("split-folders", "class-folders", "csv", "ucf101")

_UCF_LIST_DIRS = (".", "ucfTrainTestlist")
_UCF_VIDEO_DIRS = (".", "UCF-101", "UCF101")
_UCF_GROUP = re.compile(r"_g(\d+)_c\d+", re.IGNORECASE)
_EXTENSIONS_TEXT = ", ".join(sorted(VIDEO_EXTENSIONS))


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
                f"({_preview(self.class_names)}); check the label or re-index the dataset."
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
    _check_fractions(val_fraction, test_fraction)
    _check_seed(seed)

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


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
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


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise DatasetError(f"seed must be a non-negative integer, got {seed!r}; pass e.g. 1337.")


def _check_fold(fold: int) -> None:
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


# --------------------------------------------------------------------------------------------
# the entry point


def index_dataset(
    data: str | Path | None = "data",
    csv: str | Path | None = None,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 1337,
    fold: int = 1,
) -> Dataset:
    """Index ``csv`` if given, else the folder ``data`` (layout auto-detected) into a ``Dataset``.

    Detection order: ``csv`` argument > ucf101 (``classInd.txt`` present) > split-folders
    (a ``train``/``val``/``test`` subfolder) > class-folders. Raises ``DatasetError`` with a
    sentence saying what to do for anything the user can fix.
    """
    _check_fractions(val_fraction, test_fraction)
    _check_seed(seed)
    _check_fold(fold)

    if csv is not None:
        return _index_csv(Path(csv).expanduser(), str(csv), val_fraction, test_fraction, seed)

    if data is None:
        raise DatasetError(
            "No dataset given; pass --data DIR (a dataset folder) or --csv FILE (a video_name,tag list)."
        )
    folder = Path(data).expanduser()
    if not folder.exists():
        raise DatasetError(
            f"Data folder '{data}' does not exist; pass --data DIR or run `featpipe sample-data` to create the sample "
            "dataset."
        )
    if not folder.is_dir():
        hint = (
            f"pass it as --csv {data}"
            if folder.suffix.lower() == ".csv"
            else "pass --data DIR pointing at a dataset folder"
        )
        raise DatasetError(f"Data path '{data}' is a file, not a folder; {hint}.")
    root = folder.resolve()

    if _find_ucf_file(root, "classInd.txt") is not None:
        return _index_ucf101(root, str(data), val_fraction, seed, int(fold))
    present = [s for s in SPLITS if (root / s).is_dir()]
    if present:
        return _index_split_folders(root, str(data), present)
    return _index_class_folders(root, str(data), val_fraction, test_fraction, seed)


# --------------------------------------------------------------------------------------------
# folder layouts


def _is_video(path: Path) -> bool:
    return _is_video_name(path.name)


def _is_video_name(name: str) -> bool:
    """``Path(name).suffix.lower() in VIDEO_EXTENSIONS``, without building a Path (run once per file indexed)."""
    dot = name.rfind(".")
    return 0 < dot < len(name) - 1 and name[dot:].lower() in VIDEO_EXTENSIONS


def _visible(name: str) -> bool:
    return not name.startswith(".")


@dataclass(frozen=True)
class FolderClips:
    """What :func:`walk_clips` found under a folder: the clips, and the folders it could not read."""

    clips: tuple[Path, ...]  # video files, sorted
    unreadable: tuple[tuple[Path, str], ...] = ()  # (folder, why), whose clips could not be indexed


def walk_clips(folder: str | Path) -> FolderClips:
    """The one rule for the clips in a folder: `extract`'s class folders and `predict DIR` both use it.

    Video files (by extension, any case) under ``folder``, recursively, sorted; hidden files and
    folders (a leading '.') are skipped; symbolic links to folders are followed, each real folder
    visited once, so a link loop ends. A folder that cannot be listed, or listed but not entered
    (read without execute permission), is not an error here: it is returned in ``unreadable``
    with the reason, for the caller to report, and its clips are left out.
    """
    folder = Path(folder)
    found: list[Path] = []
    unreadable: list[tuple[Path, str]] = []
    seen: set[str] = set()
    stack = [folder]
    while stack:
        path = stack.pop()
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        try:
            with os.scandir(path) as it:
                entries = sorted((e for e in it if _visible(e.name)), key=lambda e: e.name)
            if entries:  # listed, but can its entries be reached? (a folder with r but not x permission)
                _reachable(entries[0].path)
        except OSError as exc:
            unreadable.append((path, _reason(exc)))
            continue
        subfolders = []
        base = Path(path)  # one Path per folder; a clip's path is then a cheap child of it
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows a symbolic link
            except OSError:
                is_dir = False  # a link into a folder we may not enter: reported per clip if it is a video
            if is_dir:
                subfolders.append(Path(entry.path))
            elif _is_video_name(entry.name):
                found.append(base / entry.name)
        stack.extend(reversed(subfolders))
    return FolderClips(tuple(sorted(found)), tuple(unreadable))


def _reachable(path: str) -> None:
    """Raise PermissionError if the folder holding ``path`` may not be entered (other errors: a race, ignored)."""
    try:
        os.lstat(path)
    except PermissionError:
        raise
    except OSError:
        pass


def _reason(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    return exc.strerror or str(exc) or type(exc).__name__


def _unreadable_folder(exc: OSError) -> None:
    """A folder that decides the dataset's layout (its root, a split folder) and cannot be listed is
    refused: its classes are unknown. (A class folder, or one below it, is reported and skipped.)"""
    raise DatasetError(
        f"Cannot read the folder '{exc.filename}': {_reason(exc)}; its clips would be left out of the dataset. "
        "Give your user read access to it (e.g. chmod a+rx) or move it out of the dataset."
    ) from exc


def unreadable_note(folder: str | Path, reason: str) -> str:
    """The sentence `extract` and `predict` print for a folder whose clips were not indexed."""
    return (
        f"cannot read the folder '{folder}' ({reason}): its clips were not indexed; "
        "give your user read access to it (e.g. chmod -R a+rX) and run again to include them."
    )


def _key(path: Path, root: Path) -> str:
    """``path.relative_to(root).as_posix()``; by string when ``path`` is spelled under ``root`` (the indexer's
    own paths: a Path parse per clip was most of the cost of indexing a large folder)."""
    text, top = str(path), str(root)
    prefix = top if top.endswith(os.sep) else top + os.sep
    if text.startswith(prefix) and len(text) > len(prefix):
        rel = text[len(prefix) :]
        return rel if os.sep == "/" else rel.replace(os.sep, "/")
    return path.relative_to(root).as_posix()


def _no_videos(data: str, layout_hint: str) -> DatasetError:
    return DatasetError(
        f"No video files found in '{data}' (accepted extensions: {_EXTENSIONS_TEXT}); "
        f"put clips in {layout_hint} or pass --data DIR pointing at your dataset."
    )


def _loose_clip(data: str, key: str, where: str) -> DatasetError:
    return DatasetError(
        f"Clip '{key}' in '{data}' is not inside a class folder; move it into {where}/<class>/ so its class is known."
    )


def _class_clips(parent: Path, data: str, root: Path, where: str, unreadable: list) -> dict[str, list[Path]]:
    """``class -> clips`` for the class folders directly under ``parent``; loose clips are refused.

    A class folder that cannot be read (or holds a folder that cannot) keeps its class, with
    the clips that could be indexed (maybe none), and lands in ``unreadable``.
    """
    classes: dict[str, list[Path]] = {}
    try:
        entries = sorted(parent.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        _unreadable_folder(exc)
    for entry in entries:
        if not _visible(entry.name):
            continue
        if _is_dir(entry):
            found = walk_clips(entry)
            if found.clips or found.unreadable:
                classes[entry.name] = list(found.clips)
                unreadable.extend(found.unreadable)
        elif _is_video(entry) and _is_file(entry):
            raise _loose_clip(data, _key(entry, root), where)
    return classes


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a link we may not follow: not a folder we can index
        return False


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def _index_split_folders(root: Path, data: str, present: list[str]) -> Dataset:
    # a class folder called "train" in a class-folders dataset would be silently misread: refuse mixes
    others = []
    unreadable: list[tuple[Path, str]] = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if not _visible(entry.name) or entry.name in SPLITS:
            continue
        found = walk_clips(entry) if _is_dir(entry) else None
        if (found is not None and found.clips) or (_is_video(entry) and _is_file(entry)):
            others.append(entry.name)
        elif found is not None:
            unreadable.extend(found.unreadable)  # what it holds is unknown: reported, not silently passed over
    if others:
        raise DatasetError(
            f"Data folder '{data}' mixes split folders ({', '.join(present)}) with other clips or folders "
            f"({_preview(others)}); use either DIR/{{train,val,test}}/<class>/<clip> or DIR/<class>/<clip>, not both."
        )
    records = []
    labels: set[str] = set()
    for split in present:
        for label, clips in _class_clips(root / split, data, root, f"{split}", unreadable).items():
            labels.add(label)
            records.extend(Record(path=p, video=_key(p, root), label=label, split=split) for p in clips)
    if not records and not unreadable:
        raise _no_videos(data, "DIR/{train,val,test}/<class>/")
    return _finish(
        root, "split-folders", records, data, class_names=tuple(sorted(labels)), unreadable=tuple(unreadable)
    )


def _index_class_folders(root: Path, data: str, val_fraction: float, test_fraction: float, seed: int) -> Dataset:
    unreadable: list[tuple[Path, str]] = []
    classes = _class_clips(root, data, root, "DIR", unreadable)
    pairs = [(p, label) for label, clips in classes.items() for p in clips]
    if not pairs and not unreadable:
        raise _no_videos(data, "DIR/<class>/ (or DIR/{train,val,test}/<class>/)")
    _require_two_classes(list(classes), data)
    keys = [_key(p, root) for p, _ in pairs]
    splits = stratified_split(keys, [label for _, label in pairs], val_fraction, test_fraction, seed)
    records = [Record(path=p, video=k, label=label, split=s) for (p, label), k, s in zip(pairs, keys, splits)]
    return _finish(
        root,
        "class-folders",
        records,
        data,
        class_names=tuple(sorted(classes)),
        split_source="drawn",
        split_params=(val_fraction, test_fraction, seed),
        unreadable=tuple(unreadable),
    )


# --------------------------------------------------------------------------------------------
# csv


def _inside(root: Path, name: str, where: str) -> tuple[Path, str]:
    """(absolute path, POSIX key) for ``name`` relative to ``root``; refuses anything outside it."""
    candidate = Path(name)
    if candidate.is_absolute() or candidate.drive:
        raise DatasetError(
            f"{where} names the absolute path '{name}'; video paths must be relative to '{root}', "
            f"so move the clip inside that folder and list it relative to it."
        )
    lexical = Path(os.path.normpath(root / candidate))
    resolved = (root / candidate).resolve()
    if lexical == root or not lexical.is_relative_to(root) or not resolved.is_relative_to(root):
        raise DatasetError(
            f"{where} names '{name}', which lies outside '{root}'; move the clip inside that folder "
            f"and list it relative to it."
        )
    return lexical, lexical.relative_to(root).as_posix()


def _index_csv(csv_path: Path, shown: str, val_fraction: float, test_fraction: float, seed: int) -> Dataset:
    if not csv_path.exists():
        raise DatasetError(
            f"CSV file '{shown}' does not exist; pass --csv FILE pointing at a list with columns video_name,tag."
        )
    if not csv_path.is_file():
        raise DatasetError(
            f"CSV path '{shown}' is not a file; pass --csv FILE pointing at a list with columns video_name,tag."
        )
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skipinitialspace=True, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise DatasetError(
            f"CSV file '{shown}' is empty; write a header line video_name,tag and one row per clip."
        ) from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatasetError(
            f"CSV file '{shown}' cannot be read ({reason}); save it as UTF-8 CSV with columns video_name,tag."
        ) from None

    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in ("video_name", "tag") if c not in table.columns]
    if missing:
        raise DatasetError(
            f"CSV file '{shown}' lacks column(s) {', '.join(missing)} (found: {_preview(list(table.columns))}); "
            f"its header must include video_name,tag (and optionally split)."
        )
    if table.empty:
        raise DatasetError(f"CSV file '{shown}' has a header but no rows; add one row per clip (video_name,tag).")

    root = csv_path.resolve().parent
    has_split = "split" in table.columns
    paths: list[Path] = []
    keys: list[str] = []
    labels: list[str] = []
    given_splits: list[str] = []
    first_line: dict[str, int] = {}
    names = table["video_name"].tolist()
    tags = table["tag"].tolist()
    raw_splits = table["split"].tolist() if has_split else [None] * len(names)
    for i, (raw_name, raw_tag, raw_split) in enumerate(zip(names, tags, raw_splits)):
        line = i + 2  # the header is line 1
        name = str(raw_name).strip()
        tag = str(raw_tag).strip()
        where = f"CSV file '{shown}' line {line}"
        if not name:
            raise DatasetError(
                f"{where} has an empty video_name; fill in the clip's path relative to the CSV's folder."
            )
        if not tag:
            raise DatasetError(f"{where} ('{name}') has an empty tag; fill in the clip's class name.")
        path, key = _inside(root, name, where)
        if key in first_line:
            raise DatasetError(
                f"{where} lists '{name}' again (first on line {first_line[key]}); remove the duplicate row."
            )
        first_line[key] = line
        if has_split:
            split = str(raw_split).strip().lower()
            if split not in SPLITS:
                raise DatasetError(f"{where} ('{name}') has split {raw_split!r}; use one of train, val, test.")
            given_splits.append(split)
        paths.append(path)
        keys.append(key)
        labels.append(tag)

    _require_two_classes(labels, shown)
    splits = given_splits if has_split else stratified_split(keys, labels, val_fraction, test_fraction, seed)
    records = [Record(path=p, video=k, label=t, split=s) for p, k, t, s in zip(paths, keys, labels, splits)]
    if has_split:
        return _finish(root, "csv", records, shown)
    return _finish(root, "csv", records, shown, split_source="drawn", split_params=(val_fraction, test_fraction, seed))


# --------------------------------------------------------------------------------------------
# ucf101


def _find_ucf_file(root: Path, name: str) -> Path | None:
    for sub in _UCF_LIST_DIRS:
        candidate = root / sub / name
        if candidate.is_file():
            return candidate
    return None


def _read_lines(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, whitespace-split fields) of each non-blank line."""
    try:
        text = path.read_text(encoding="utf-8-sig", errors="strict")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"UCF101 list '{path}' cannot be read ({exc}); re-extract ucfTrainTestlist.") from None
    return [(n, line.split()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _index_ucf101(root: Path, data: str, val_fraction: float, seed: int, fold: int) -> Dataset:
    class_file = _find_ucf_file(root, "classInd.txt")
    if class_file is None:  # detection found it a moment ago; it vanished since
        raise DatasetError(f"UCF101 classInd.txt is no longer in '{data}'; restore it and run again.")
    train_file = _find_ucf_file(root, f"trainlist{fold:02d}.txt")
    test_file = _find_ucf_file(root, f"testlist{fold:02d}.txt")
    missing = [
        n for n, f in ((f"trainlist{fold:02d}.txt", train_file), (f"testlist{fold:02d}.txt", test_file)) if f is None
    ]
    if missing:
        raise DatasetError(
            f"UCF101 split list(s) {', '.join(missing)} for fold {fold} not found in '{data}' or "
            f"'{data}/ucfTrainTestlist'; put the official ucfTrainTestlist files there or pick another --fold."
        )

    by_number: dict[int, str] = {}
    for line, fields in _read_lines(class_file):
        if len(fields) != 2 or not fields[0].isdigit():
            raise DatasetError(
                f"UCF101 classInd '{class_file}' line {line} reads {' '.join(fields)!r}, expected '<number> "
                "<ClassName>'; "
                f"restore the official classInd.txt."
            )
        by_number[int(fields[0])] = fields[1]
    class_set = set(by_number.values())
    if not class_set:
        raise DatasetError(f"UCF101 classInd '{class_file}' lists no classes; restore the official classInd.txt.")

    entries: list[tuple[str, str, str]] = []  # (listed name, label, list split)
    for list_file, list_split in ((train_file, "train"), (test_file, "test")):
        for line, fields in _read_lines(list_file):
            name = fields[0]
            where = f"UCF101 list '{list_file.name}' line {line}"
            parts = name.replace("\\", "/").split("/")
            if len(fields) > 2 or len(parts) < 2:
                raise DatasetError(
                    f"{where} reads {' '.join(fields)!r}, expected '<Class>/<clip>.avi [number]'; restore the official "
                    "list."
                )
            label = parts[-2]
            if label not in class_set:
                raise DatasetError(
                    f"{where} names class '{label}', which classInd.txt does not list; restore the official lists."
                )
            if len(fields) == 2:
                if not fields[1].isdigit() or by_number.get(int(fields[1])) != label:
                    raise DatasetError(
                        f"{where} gives class number {fields[1]!r} for '{label}', but classInd.txt disagrees; "
                        f"restore the official lists."
                    )
            entries.append(("/".join(parts), label, list_split))
    if not entries:
        raise DatasetError(
            f"UCF101 lists for fold {fold} in '{data}' list no clips; restore the official ucfTrainTestlist files."
        )

    video_root = _ucf_video_root(root, data, [e[0] for e in entries])
    seen: dict[str, str] = {}
    resolved: list[tuple[Path, str, str, str]] = []
    for name, label, list_split in entries:
        path, key = _inside(video_root, name, f"UCF101 fold {fold} lists")
        if key in seen:
            raise DatasetError(
                f"UCF101 fold {fold} lists '{name}' twice ({seen[key]} and {list_split} list); restore the official "
                "lists."
            )
        seen[key] = list_split
        resolved.append((path, key, label, list_split))

    train = [r for r in resolved if r[3] == "train"]
    groups = []
    for path, key, label, _ in train:
        match = _UCF_GROUP.search(path.name)
        groups.append(f"{label}/g{int(match.group(1)):02d}" if match else key)
    train_splits = stratified_split(
        [r[1] for r in train], [r[2] for r in train], val_fraction, 0.0, seed, groups=groups
    )
    split_of = {r[1]: s for r, s in zip(train, train_splits)}
    records = [
        Record(path=path, video=key, label=label, split=split_of.get(key, "test")) for path, key, label, _ in resolved
    ]
    return _finish(video_root, "ucf101", records, data, class_names=tuple(sorted(class_set)), split_source="lists")


def _ucf_video_root(root: Path, data: str, names: list[str]) -> Path:
    """The candidate root holding the most listed clips (ties: the first of DIR, UCF-101, UCF101)."""
    best, best_hits = None, 0
    for sub in _UCF_VIDEO_DIRS:
        candidate = (root / sub).resolve() if sub != "." else root
        if not candidate.is_dir():
            continue
        hits = sum(_is_file(candidate / n) for n in names)
        if hits > best_hits:
            best, best_hits = candidate, hits
    if best is None:
        raise DatasetError(
            f"None of the {len(names)} clips the UCF101 lists name exist under '{data}', '{data}/UCF-101' or "
            f"'{data}/UCF101'; extract UCF101.rar into one of them."
        )
    return best


# --------------------------------------------------------------------------------------------
# shared


def _require_two_classes(labels: Sequence[str], data: str) -> None:
    names = sorted(set(labels))
    if len(names) < 2:
        found = f"only '{names[0]}'" if names else "none"
        raise DatasetError(f"Dataset '{data}' needs at least two classes, found {found}; add clips of another class.")


def _finish(
    root: Path,
    layout: str,
    records: list[Record],
    data: str,
    class_names: tuple[str, ...] | None = None,
    split_source: str = "given",
    split_params: tuple = (),
    unreadable: tuple = (),
) -> Dataset:
    records.sort(key=lambda r: r.video)
    if class_names is None:
        class_names = tuple(sorted({r.label for r in records}))
    if len(class_names) < 2:
        _require_two_classes(class_names, data)
    return Dataset(
        root=root,
        layout=layout,
        class_names=class_names,
        records=tuple(records),
        split_source=split_source,
        split_params=tuple(split_params),
        unreadable=tuple(unreadable),
    )


def _preview(items: Sequence[str], limit: int = 8) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")
