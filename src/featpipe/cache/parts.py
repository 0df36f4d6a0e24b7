"""Writing cache files: one file built in memory, part files, the virtual dataset over them, and the
removal of part files no cache references. Every cache file is written to a temporary beside it
(:func:`replacing`) that replaces it atomically; part files are immutable, each written once."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np

from featpipe.cache.lock import no_readers
from featpipe.cache.reader import Row, check_masks, read_slab
from featpipe.cache.schema import (
    MASK_CRC,
    SCHEMA_VERSION,
    UNKNOWN,
    CacheConfig,
    Identity,
    mask_crc32,
    parts_dir,
    read_times,
)
from featpipe.runtime.atomic import atomic_path, fsync_dir, whole_or_nothing

# Features per part file written by extract: each part is built in memory and written by Python, so a full
# disk is a plain OSError (HDF5 itself meeting ENOSPC cannot close the file, and its handles crash the process).
PART_BYTES = 64 << 20


def row_bytes(config: CacheConfig) -> int:
    return max(1, int(np.prod((config.frames, *config.feature_shape))) * np.dtype(config.dtype).itemsize)


def one_file_limit() -> int:
    """Bytes of features up to which a cache is written as one file (``FEATPIPE_ONE_FILE_MB``, default 64)."""
    raw = os.environ.get("FEATPIPE_ONE_FILE_MB", "").strip()
    try:
        mb = float(raw) if raw else 64.0
    except ValueError:
        mb = 64.0
    return int(max(mb, 0.0) * (1 << 20)) if np.isfinite(mb) else 1 << 62


@dataclass
class Columns:
    """The small per-row columns of a cache being written (everything but the features)."""

    keys: list
    mask: np.ndarray  # (N, T) bool
    label: np.ndarray
    split: list
    n_frames: np.ndarray
    size: np.ndarray
    mtime_ns: np.ndarray
    time: np.ndarray | None = None  # (N, T) float32, NaN on padding and where not recorded (None: all NaN)
    duration: np.ndarray | None = None  # (N,) float32 (None: all NaN)
    fps: np.ndarray | None = None  # (N,) float32 (None: all NaN)

    def __post_init__(self):
        n, t = self.mask.shape
        if self.time is None:
            self.time = np.full((n, t), np.nan, dtype=np.float32)
        if self.duration is None:
            self.duration = np.full(n, np.nan, dtype=np.float32)
        if self.fps is None:
            self.fps = np.full(n, np.nan, dtype=np.float32)

    @classmethod
    def read(cls, f, rows: np.ndarray, keys: list | None = None, splits: list | None = None) -> "Columns":
        """Rows ``rows`` (in that order) of an open cache; ``keys`` / ``splits``, when the caller knows them
        (its keys of those rows, the splits they get), are taken instead of read."""
        n = int(f["label"].shape[0])
        if "size" in f and "mtime_ns" in f:
            size, mtime = f["size"][:], f["mtime_ns"][:]
        else:
            size = mtime = np.full(n, UNKNOWN, dtype=np.int64)
        mask = f["mask"][()]
        check_masks(f, f.filename, mask)
        time, duration, fps = read_times(f, rows)
        return cls(
            list(keys) if keys is not None else list(f["video"].asstr()[:][rows]),
            mask[rows].astype(bool),
            f["label"][:][rows],
            list(splits) if splits is not None else list(f["split"].asstr()[:][rows]),
            f["n_frames"][:][rows],
            size[rows],
            mtime[rows],
            time,
            duration,
            fps,
        )

    @classmethod
    def concat(cls, parts: list["Columns"], t: int) -> "Columns":
        if not parts:
            e = np.zeros(0, dtype=np.int64)
            return cls([], np.zeros((0, t), dtype=bool), e, [], e, e, e)
        return cls(
            sum((p.keys for p in parts), []),
            np.concatenate([p.mask for p in parts]),
            np.concatenate([p.label for p in parts]),
            sum((p.split for p in parts), []),
            np.concatenate([p.n_frames for p in parts]),
            np.concatenate([p.size for p in parts]),
            np.concatenate([p.mtime_ns for p in parts]),
            np.concatenate([p.time for p in parts]),
            np.concatenate([p.duration for p in parts]),
            np.concatenate([p.fps for p in parts]),
        )


@dataclass
class Sources:
    """Where a cache's features are: files (paths), their row counts, and per row the file index and row."""

    files: list
    rows: list
    index: np.ndarray
    row: np.ndarray


def sources_of(f, path: Path) -> Sources:
    """The files holding an open cache's features: its part files, or the file itself when it is one file."""
    if "parts" in f:
        g = f["parts"]
        return Sources(
            [path.parent / n for n in g["file"].asstr()[:]],
            [int(r) for r in g["rows"][:]],
            g["index"][:].astype(np.int64),
            g["row"][:].astype(np.int64),
        )
    n = int(f["features"].shape[0])
    return Sources([path], [n], np.zeros(n, dtype=np.int64), np.arange(n, dtype=np.int64))


_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, getattr(errno, "ENOTSUP", -1), getattr(errno, "EOPNOTSUPP", -1)}


def _link_part(src: Path, parts: Path) -> str:
    """Make the immutable file ``src`` one of the parts in ``parts``; return its name relative to the cache's folder.

    A hard link costs no time or space and survives the deletion of ``src`` (e.g. a merged
    shard); where the file system has no hard links, the file is copied.
    """
    src = Path(src)
    if src.parent.resolve() == parts.resolve():
        return f"{parts.name}/{src.name}"
    parts.mkdir(parents=True, exist_ok=True)
    target = parts / src.name
    if src.parent.name.endswith(".parts") and target.exists() and os.path.samefile(target, src):
        return f"{parts.name}/{target.name}"  # linked by an earlier merge into this cache
    if not src.parent.name.endswith(".parts") or target.exists():
        target = parts / f"{uuid.uuid4().hex}.h5"
    try:
        os.link(src, target)
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            raise
        with whole_or_nothing(target):
            shutil.copyfile(src, target)
    return f"{parts.name}/{target.name}"


def write_part(parts: Path, config: CacheConfig, n: int, features: Iterator[np.ndarray]) -> Path:
    """Write ``n`` clips' features into a new, immutable part file in ``parts``, fsync it and return its path."""
    c = config
    parts.mkdir(parents=True, exist_ok=True)
    path = parts / f"{uuid.uuid4().hex}.h5"
    with whole_or_nothing(path):
        with _h5_create(path, in_memory=True) as f:  # at most PART_BYTES of features
            f.attrs["featpipe_part"] = SCHEMA_VERSION
            feats = f.create_dataset(
                "features",
                shape=(n, c.frames, *c.feature_shape),
                dtype=c.dtype,
                chunks=(1, c.frames, *c.feature_shape),
                fletcher32=True,
            )
            for i, x in enumerate(features):
                feats[i] = x
    return path


def temporary(path: Path) -> Path:
    """The temporary a write of the cache ``path`` fills before it replaces ``path`` (this process's own)."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary beside the cache file ``path`` to write; when the block ends cleanly it is fsynced and
    atomically replaces ``path``, on any failure it is removed and ``path`` is unchanged."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, temporary(path)) as tmp:
        yield tmp


def remove_stale_temporaries(path: Path) -> None:
    """Drop what a write killed before its rename left beside ``path`` (the old file is intact)."""
    for stale in path.parent.glob(path.name + ".tmp-*"):
        stale.unlink()


@contextmanager
def _h5_create(path: Path, in_memory: bool):
    """A new HDF5 file at ``path``; ``in_memory``: built in memory, its bytes written by Python on success."""
    if not in_memory:
        with h5py.File(path, "w") as out:
            yield out
        return
    out = h5py.File(path, "w", driver="core", backing_store=False)
    try:
        yield out
        out.flush()
        image = out.id.get_file_image()
    finally:
        out.close()
    with open(path, "wb") as fh:  # ENOSPC surfaces here, as a plain OSError, with no HDF5 handle open
        fh.write(image)


def write_temporary(
    tmp: Path,
    config: CacheConfig,
    keys: list[str],
    read_row: Callable[[str], Row],
    failed: dict[str, str],
    failed_identity: dict[str, Identity] | None = None,
    stale: dict[str, str] | None = None,
    in_memory: bool = False,
) -> None:
    """Write a complete cache into ``tmp``, a temporary file beside the cache (see :func:`replacing`).

    ``in_memory`` (a size known to be bounded): HDF5 builds the file in memory and Python writes its bytes,
    so a full disk is an OSError here, after HDF5 has closed the file cleanly. (HDF5 meeting ENOSPC itself
    cannot close the file: its handles then crash the interpreter when they are freed, or at exit.)

    ``keys`` (sorted) become the rows, read one clip at a time with ``read_row``, so memory stays
    bounded whatever the cache size; ``failed`` maps clip key -> reason. Used by ``merge_shards`` and
    ``compact_cache``. ``failed_identity`` maps failed keys -> (size, mtime_ns); ``stale`` maps dropped
    clip keys -> why.
    """
    c = config
    n, t = len(keys), c.frames
    with _h5_create(tmp, in_memory) as out:
        feats = _start_cache_file(out, c, n)
        labels = np.zeros(n, dtype=np.int64)
        splits, n_frames = [], np.zeros(n, dtype=np.int64)
        sizes, mtimes = np.full(n, UNKNOWN, dtype=np.int64), np.full(n, UNKNOWN, dtype=np.int64)
        mask_all = np.zeros((n, t), dtype=bool)
        time = np.full((n, t), np.nan, dtype=np.float32)
        duration, fps = np.full(n, np.nan, dtype=np.float32), np.full(n, np.nan, dtype=np.float32)
        for i, key in enumerate(keys):
            row = read_row(key)
            feats[i] = row.features
            mask_all[i] = row.mask
            labels[i] = row.label
            splits.append(row.split)
            n_frames[i] = row.n_frames
            sizes[i], mtimes[i] = row.size, row.mtime_ns
            time[i], duration[i], fps[i] = row.times, row.duration, row.fps
        _write_mask(out, mask_all)
        _write_columns(out, keys, labels, splits, n_frames, sizes, mtimes, failed, failed_identity, stale)
        _write_times(out, time, duration, fps)


def _start_cache_file(out, config: CacheConfig, n: int):
    """Write a new one-file cache's attributes and create its ``features`` dataset of ``n`` rows; return it."""
    c = config
    for k, v in c.attrs().items():
        out.attrs[k] = v
    # fletcher32: a checksum per chunk (one row), checked by HDF5 on every read, transparent to
    # plain h5py readers; a damaged row then fails to read instead of reading as wrong numbers
    return out.create_dataset(
        "features",
        shape=(n, c.frames, *c.feature_shape),
        dtype=c.dtype,
        chunks=(1, c.frames, *c.feature_shape) if n else None,
        fletcher32=True,
    )


_SLAB_BYTES = 16 << 20  # features copied at once when a one-file cache is written anew


def write_one_file_temporary(
    tmp: Path,
    config: CacheConfig,
    keys: list[str],
    old,
    at: np.ndarray,
    fresh: dict[int, np.ndarray],
    mask,
    labels,
    splits,
    n_frames,
    sizes,
    mtimes,
    failed: dict[str, str],
    failed_identity: dict[str, Identity] | None,
    stale: dict[str, str] | None,
    timing: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> None:
    """``write_temporary``'s file from whole columns: row ``i``'s features are row ``at[i]`` of the open cache
    ``old`` (copied in slabs of consecutive rows) or, where ``at[i]`` < 0, ``fresh[i]``. A slab that fails to
    read is read again row by row, so a damaged row is named as ``RowReader`` names it. ``timing``: the
    rows' (time, duration, fps), NaN where not recorded (None: not recorded for any)."""
    c = config
    n, t = len(keys), c.frames
    slab = max(1, _SLAB_BYTES // row_bytes(c))  # rows per copy: memory stays bounded whatever the cache size
    # built in memory (at most the one-file limit): a full disk is then an OSError after HDF5 closed the file
    with _h5_create(tmp, in_memory=True) as out:
        feats = _start_cache_file(out, c, n)
        copied = np.flatnonzero(at >= 0)
        if len(copied):
            source = old["features"]
            # runs of rows consecutive both here and in the old cache, cut into slabs
            cuts = np.flatnonzero((np.diff(copied) != 1) | (np.diff(at[copied]) != 1)) + 1
            for run in np.split(copied, cuts):
                for a in range(0, len(run), slab):
                    piece = run[a : a + slab]
                    first, last = int(at[piece[0]]), int(at[piece[-1]]) + 1
                    feats[int(piece[0]) : int(piece[-1]) + 1] = read_slab(old, source, first, last)
        for i, features in fresh.items():
            feats[i] = features
        _write_mask(out, np.asarray(mask, dtype=bool).reshape(n, t))
        _write_columns(out, keys, labels, splits, n_frames, sizes, mtimes, failed, failed_identity, stale)
        if timing is None:
            timing = (np.full((n, t), np.nan), np.full(n, np.nan), np.full(n, np.nan))
        _write_times(out, *timing)


def _write_mask(out, mask: np.ndarray) -> None:
    """The ``mask`` dataset of a cache being written, and its per-row checksums."""
    mask = np.asarray(mask)
    mask = (mask.view(np.uint8) if mask.dtype == bool else mask) != 0
    out.create_dataset("mask", data=mask)
    out.create_dataset(MASK_CRC, data=mask_crc32(mask))


def _write_times(out, time, duration, fps) -> None:
    """The frame-time columns (version 4) of a cache being written: NaN where not recorded."""
    out.create_dataset("time", data=np.asarray(time, dtype=np.float32))
    out.create_dataset("duration", data=np.asarray(duration, dtype=np.float32))
    out.create_dataset("fps", data=np.asarray(fps, dtype=np.float32))


def _write_columns(
    out,
    keys,
    labels,
    splits,
    n_frames,
    sizes,
    mtimes,
    failed: dict[str, str],
    failed_identity: dict[str, Identity] | None,
    stale: dict[str, str] | None,
) -> None:
    """The small per-row columns and the failed/ and stale/ groups of a cache being written."""
    str_dt = h5py.string_dtype()
    failed_keys = sorted(failed)
    out.create_dataset("label", data=np.asarray(labels, dtype=np.int64))
    out.create_dataset("split", data=np.array(list(splits), dtype=object), dtype=str_dt)
    out.create_dataset("video", data=np.array(list(keys), dtype=object), dtype=str_dt)
    out.create_dataset("n_frames", data=np.asarray(n_frames, dtype=np.int64))
    out.create_dataset("size", data=np.asarray(sizes, dtype=np.int64))
    out.create_dataset("mtime_ns", data=np.asarray(mtimes, dtype=np.int64))
    grp = out.create_group("failed")
    grp.create_dataset("video", data=np.array(failed_keys, dtype=object), dtype=str_dt)
    grp.create_dataset("reason", data=np.array([failed[k] for k in failed_keys], dtype=object), dtype=str_dt)
    f_ident = [(failed_identity or {}).get(k) or (UNKNOWN, UNKNOWN) for k in failed_keys]
    grp.create_dataset("size", data=np.array([i[0] for i in f_ident], dtype=np.int64))
    grp.create_dataset("mtime_ns", data=np.array([i[1] for i in f_ident], dtype=np.int64))
    stale = stale or {}
    stale_keys = sorted(stale)
    grp = out.create_group("stale")
    grp.create_dataset("video", data=np.array(stale_keys, dtype=object), dtype=str_dt)
    grp.create_dataset("reason", data=np.array([stale[k] for k in stale_keys], dtype=object), dtype=str_dt)


def write_parted_temporary(
    tmp: Path,
    path: Path,
    config: CacheConfig,
    cols: Columns,
    src: Sources,
    failed: dict[str, str],
    failed_identity: dict[str, Identity] | None,
    stale: dict[str, str] | None,
) -> None:
    """Like ``write_temporary``, but ``features`` is a virtual dataset over the files of ``src``; ``tmp``
    will replace the cache ``path``.

    The files ``src.index`` uses are linked into ``<path>.parts/`` first (nothing is copied),
    so the cache never depends on files outside its own parts folder. One mapping per run of
    consecutive rows of one file: a few per part, whatever the number of rows.
    """
    c = config
    parts = parts_dir(path)
    used = np.unique(src.index)
    names = [_link_part(Path(src.files[i]), parts) for i in used]
    counts = [int(src.rows[i]) for i in used]
    renumber = np.full(len(src.files), -1, dtype=np.int64)
    renumber[used] = np.arange(len(used))
    index, row = renumber[src.index], src.row
    fsync_dir(parts)
    n, tail = len(index), (c.frames, *c.feature_shape)
    # small (the mapping and the per-row columns): built in memory, so a full disk is a plain OSError
    with _h5_create(tmp, in_memory=True) as out:
        for k, v in c.attrs().items():
            out.attrs[k] = v
        layout = h5py.VirtualLayout(shape=(n, *tail), dtype=c.dtype)
        sources = [
            h5py.VirtualSource(name, "features", shape=(rows, *tail), dtype=c.dtype)
            for name, rows in zip(names, counts)
        ]
        cuts = np.flatnonzero((np.diff(index) != 0) | (np.diff(row) != 1)) + 1
        for a, b in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [n]])):
            first = int(row[a])
            layout[int(a) : int(b)] = sources[int(index[a])][first : first + int(b - a)]
        # a part file gone missing reads as NaN, not as plausible zeros (training refuses NaN features)
        missing = np.nan if np.dtype(c.dtype).kind == "f" else None
        out.create_virtual_dataset("features", layout, fillvalue=missing)
        _write_mask(out, cols.mask)
        _write_columns(
            out,
            cols.keys,
            cols.label,
            cols.split,
            cols.n_frames,
            cols.size,
            cols.mtime_ns,
            failed,
            failed_identity,
            stale,
        )
        _write_times(out, cols.time, cols.duration, cols.fps)
        grp = out.create_group("parts")
        grp.create_dataset("file", data=np.array(names, dtype=object), dtype=h5py.string_dtype())
        grp.create_dataset("rows", data=np.array(counts, dtype=np.int64))
        grp.create_dataset("index", data=index.astype(np.int64))
        grp.create_dataset("row", data=row.astype(np.int64))


def collect_parts(path: Path) -> None:
    """Remove the part files of ``path`` that its cache file does not reference (best effort; under its lock)."""
    parts = parts_dir(path)
    if not parts.is_dir():
        return
    keep: set[str] = set()
    if path.exists():
        try:
            with h5py.File(path, "r") as f:
                if "parts" in f:
                    keep = {Path(n).name for n in f["parts/file"].asstr()[:]}
        except (OSError, KeyError, ValueError):
            return  # unreadable now: leave every part alone
    try:
        unused = [p for p in parts.iterdir() if p.name not in keep and p.is_file()]
        if unused:
            with no_readers(path) as alone:
                if not alone:
                    return  # a reader may still read them through the cache file it opened: they go later
                for p in unused:
                    p.unlink()
        if not any(parts.iterdir()):
            parts.rmdir()
    except OSError:
        pass  # a read-only or vanished folder: the orphans cost only space and go next time
