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

Splits are drawn by :func:`featpipe.video.records.stratified_split` (deterministic, seeded); folders
are walked by :mod:`featpipe.video.folders`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import pandas as pd

from featpipe.errors import DatasetError
from featpipe.names import SPLITS
from featpipe.video.folders import (
    VIDEO_EXTENSIONS,
    is_dir,
    is_file,
    is_video,
    refuse_unreadable_folder,
    visible,
    walk_clips,
)
from featpipe.video.records import Dataset, Record, check_fold, check_fractions, check_seed, preview, stratified_split

LAYOUTS = ("split-folders", "class-folders", "csv", "ucf101")

_UCF_LIST_DIRS = (".", "ucfTrainTestlist")
_UCF_VIDEO_DIRS = (".", "UCF-101", "UCF101")
_UCF_GROUP = re.compile(r"_g(\d+)_c\d+", re.IGNORECASE)
_EXTENSIONS_TEXT = ", ".join(sorted(VIDEO_EXTENSIONS))


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
    check_fractions(val_fraction, test_fraction)
    check_seed(seed)
    check_fold(fold)

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
        refuse_unreadable_folder(exc)
    for entry in entries:
        if not visible(entry.name):
            continue
        if is_dir(entry):
            found = walk_clips(entry)
            if found.clips or found.unreadable:
                classes[entry.name] = list(found.clips)
                unreadable.extend(found.unreadable)
        elif is_video(entry) and is_file(entry):
            raise _loose_clip(data, _key(entry, root), where)
    return classes


def _index_split_folders(root: Path, data: str, present: list[str]) -> Dataset:
    # a class folder called "train" in a class-folders dataset would be silently misread: refuse mixes
    others = []
    unreadable: list[tuple[Path, str]] = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if not visible(entry.name) or entry.name in SPLITS:
            continue
        found = walk_clips(entry) if is_dir(entry) else None
        if (found is not None and found.clips) or (is_video(entry) and is_file(entry)):
            others.append(entry.name)
        elif found is not None:
            unreadable.extend(found.unreadable)  # what it holds is unknown: reported, not silently passed over
    if others:
        raise DatasetError(
            f"Data folder '{data}' mixes split folders ({', '.join(present)}) with other clips or folders "
            f"({preview(others)}); use either DIR/{{train,val,test}}/<class>/<clip> or DIR/<class>/<clip>, not both."
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
            f"CSV file '{shown}' lacks column(s) {', '.join(missing)} (found: {preview(list(table.columns))}); "
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
        hits = sum(is_file(candidate / n) for n in names)
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
