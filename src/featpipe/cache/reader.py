"""Reading a cache: open it (every way it can be wrong is one sentence), summarize it, read rows and
features, and name the clips whose features, masks or part files are damaged."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from featpipe.cache.lock import Reader
from featpipe.cache.schema import (
    MASK_CRC,
    READABLE_VERSIONS,
    UNKNOWN,
    CacheConfig,
    as_str,
    mask_damage,
    parts_dir,
    read_times,
    strings,
)
from featpipe.errors import CacheError, DamagedCacheError
from featpipe.names import SPLITS


class _CacheFile(h5py.File):
    """A cache opened by :func:`open_h5`: closing it also ends its reader registration."""

    _reader: Reader | None = None

    def close(self):
        try:
            super().close()
        finally:
            reader, self._reader = self._reader, None
            if reader is not None:
                reader.release()


def read_config(path: Path) -> CacheConfig:
    """Open a finished cache just long enough to validate and return its config."""
    with open_h5(path) as f:
        return CacheConfig.from_attrs(dict(f.attrs))


def open_h5(path: Path):
    """Open a cache read-only, turning every way it can be wrong into one CacheError sentence.

    A cache kept in part files is registered as read (see "readers" in featpipe.cache.lock) until the file is
    closed: part files it names are not deleted while it is open, whatever replaces the cache.
    """
    path = Path(path)
    f = _open_cache_file(path)
    if "parts" not in f:
        return f
    reader = Reader.register(path)
    missing = _missing_part_files(f, path)
    if missing and reader is not None:
        # the cache was replaced, and its old parts removed, between opening it and registering:
        # the cache now at ``path`` is whole, and its parts stay while we are registered
        f.close()
        f = _open_cache_file(path)
        missing = _missing_part_files(f, path) if "parts" in f else []
    if missing:
        f.close()
        if reader is not None:
            reader.release()
        raise CacheError(
            f"'{path}' keeps its features in part files beside it, and '{path.parent / missing[0]}' is missing"
            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; copy the cache together with its "
            f"'{parts_dir(path).name}' folder, or, where the cache and its parts are, write a one-file copy with "
            f"`featpipe merge --compact --output NEW.h5 {path.name}`."
        )
    f._reader = reader
    return f


def _open_cache_file(path: Path) -> "_CacheFile":
    if not path.exists():
        raise CacheError(f"Cache file '{path}' does not exist; run `featpipe extract` first or pass --cache FILE.")
    if path.is_dir():
        raise CacheError(f"'{path}' is a folder, not a cache file; name the .h5 file inside it.")
    try:
        f = _CacheFile(path, "r")
    except OSError as exc:
        text = str(exc).lower()
        if isinstance(exc, BlockingIOError) or "unable to lock file" in text:
            raise CacheError(
                f"'{path}' is open for writing in another program (HDF5 file lock); wait for that program to finish "
                f"or close the file, then run again."
            ) from None
        if isinstance(exc, PermissionError) or "permission denied" in text:
            raise CacheError(f"'{path}' cannot be read (permission denied); give yourself read access to it.") from None
        raise CacheError(
            f"'{path}' is not a readable HDF5 file ({exc}); it is truncated or damaged: restore it from a backup, "
            f"or move it away and run `featpipe extract` to write it anew."
        ) from None
    version = f.attrs.get("schema_version")
    if version is None:
        f.close()
        raise CacheError(f"'{path}' is an HDF5 file but not a featpipe cache (no schema_version attribute).")
    if int(version) not in READABLE_VERSIONS:
        f.close()
        raise CacheError(
            f"'{path}' uses cache schema version {int(version)}, this featpipe reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; "
            f"re-extract it with this version of featpipe."
        )
    return f


def _missing_part_files(f, path: Path) -> list[str]:
    """The part files an open cache names that are not there (a virtual dataset would read NaN for them)."""
    try:
        return [n for n in f["parts/file"].asstr()[:] if not (path.parent / n).is_file()]
    except (KeyError, OSError, ValueError):
        f.close()
        raise CacheError(
            f"'{path}' has a damaged parts/ group; restore it from a backup, or move it away and "
            f"run `featpipe extract` to write it anew."
        ) from None


@dataclass
class CacheSummary:
    path: Path
    config: CacheConfig
    n_clips: int
    n_failed: int
    counts: dict[str, dict[str, int]]  # split -> class -> clips
    failed: list[tuple[str, str]]
    real_frames: int
    stale: list[tuple[str, str]] = field(default_factory=list)  # rows dropped because their clip left the dataset
    parts: int = 0  # part files holding the features (0: the cache is one file)
    duration: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # (N,) s, NaN: not recorded
    fps: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # (N,), 0: none in the container

    def timing_line(self) -> str | None:
        """Clip durations, frame rates and whether frame times are recorded (None for a cache without rows)."""
        if not self.n_clips:
            return None
        timed = ~np.isnan(self.duration)
        n_timed = int(timed.sum())
        if not n_timed:
            return "  frame times: not recorded (written by an older featpipe)"
        d = self.duration[timed]
        rate = self.fps[timed]
        known = rate[rate > 0]
        if not len(known):
            rates = "frame rate unknown"
        else:
            lo, hi = float(known.min()), float(known.max())
            rates = f"{lo:.4g} fps" if lo == hi else f"{lo:.4g} to {hi:.4g} fps"
            if len(known) < len(rate):
                rates += f" ({len(rate) - len(known)} without a frame rate)"
        recorded = (
            "recorded"
            if n_timed == self.n_clips
            else f"recorded for {n_timed} of {self.n_clips} clips (the rest written by an older featpipe)"
        )
        return (
            f"  clips {d.min():.1f} / {np.median(d):.1f} / {d.max():.1f} s long (min / median / max), {rates}; "
            f"frame times: {recorded}"
        )

    def lines(self) -> list[str]:
        c = self.config
        shard = (
            f" (shard {as_str(c.extra['shard'])}; combine the shards with `featpipe merge`)"
            if "shard" in c.extra
            else ""
        )
        out = [
            f"Cache {self.path}{shard}: {self.n_clips} clips, {self.real_frames} real frames, {self.n_failed} failed",
            f"  backbone {c.backbone} ({c.weights}, fingerprint {c.weights_fingerprint}), input {c.input_size}px, "
            f"{c.frames} frames ({c.sampling}), features {list(c.feature_shape)} {c.dtype}",
        ]
        if self.parts:
            out.append(f"  features in {self.parts} part file(s) in {parts_dir(self.path)}/ (copy it with the cache)")
        timing = self.timing_line()
        if timing:
            out.append(timing)
        width = max(len(n) for n in c.class_names)
        splits = [s for s in SPLITS if s in self.counts] + sorted(s for s in self.counts if s not in SPLITS)
        out.append("  " + "class".ljust(width) + "".join(s.rjust(8) for s in splits))
        for name in c.class_names:
            out.append("  " + name.ljust(width) + "".join(str(self.counts[s].get(name, 0)).rjust(8) for s in splits))
        for video, reason in self.failed:
            out.append(f"  failed: {video}: {reason}")
        for video, reason in self.stale:
            out.append(f"  dropped: {video}: {reason}")
        return out


def summarize(path: Path) -> CacheSummary:
    with open_h5(path) as f:
        config = CacheConfig.from_attrs(dict(f.attrs))
        labels = f["label"][:]
        counts: dict[str, dict[str, int]] = {}
        # counted as (split bytes, label) pairs, names decoded once per pair: no Python objects per clip
        for (sp, lab), n in Counter(zip(f["split"][:].tolist(), labels.tolist())).items():
            name = sp.decode() if isinstance(sp, bytes) else str(sp)
            counts.setdefault(name, {})[config.class_names[int(lab)]] = n
        failed = list(zip(strings(f, "failed/video"), strings(f, "failed/reason")))
        stale = list(zip(strings(f, "stale/video"), strings(f, "stale/reason")))
        parts = len(f["parts/file"]) if "parts" in f else 0
        nan = np.full(len(labels), np.nan, dtype=np.float32)
        duration = f["duration"][()].astype(np.float32) if "duration" in f else nan
        fps = f["fps"][()].astype(np.float32) if "fps" in f else nan
        return CacheSummary(
            path,
            config,
            len(labels),
            len(failed),
            counts,
            failed,
            int(f["mask"][:].sum()),
            stale,
            parts,
            duration,
            fps,
        )


@dataclass(frozen=True)
class Row:
    """One clip's row of a cache, as read from a cache, a journal or a shard."""

    features: np.ndarray  # (T, *feature_shape)
    mask: np.ndarray  # (T,) bool
    label: int
    split: str
    n_frames: int
    size: int = UNKNOWN  # the clip's identity (UNKNOWN in version 1 caches)
    mtime_ns: int = UNKNOWN
    times: np.ndarray | None = None  # (T,) float32 seconds from the clip's first frame, NaN on padding
    duration: float = float("nan")  # the clip's length in seconds
    fps: float = float("nan")  # the container's frame rate, 0 when it reports none
    # times, duration and fps are NaN in rows written before frame times were recorded (versions 1 to 3)

    def __post_init__(self):
        if self.times is None:
            object.__setattr__(self, "times", np.full(len(self.mask), np.nan, dtype=np.float32))


@dataclass(frozen=True)
class ClipTimes:
    """When a clip's kept frames are: what ``frame_times`` returns per clip."""

    times: np.ndarray  # (real frames,) float32: each kept frame's time in seconds from the clip's first frame
    duration: float  # the clip's length in seconds
    fps: float  # the container's frame rate (0: it reports none)
    # all NaN in a cache written before frame times were recorded (versions 1 to 3): "not recorded"

    @property
    def recorded(self) -> bool:
        return not np.isnan(self.duration)


def frame_times(path) -> dict[str, ClipTimes]:
    """Clip key -> its :class:`ClipTimes` for every row of the cache ``path`` (NaN where not recorded)."""
    with open_h5(Path(path)) as f:
        mask = f["mask"][()].astype(bool)
        time, duration, fps = read_times(f)
        keys = f["video"].asstr()[()]
    return {str(k): ClipTimes(time[i][mask[i]], float(duration[i]), float(fps[i])) for i, k in enumerate(keys)}


class RowReader:
    """Reads rows of an open cache one at a time, holding its datasets open (opening a virtual
    dataset opens its part files: once per reader, not once per row)."""

    def __init__(self, f):
        self.file = f
        self.features, self.mask, self.label, self.n_frames = f["features"], f["mask"], f["label"], f["n_frames"]
        self.split = f["split"].asstr()
        self.ident = (f["size"], f["mtime_ns"]) if "size" in f and "mtime_ns" in f else None
        self.mask_crc = f[MASK_CRC][()] if MASK_CRC in f else None
        # small columns read whole (N x T float32): not three HDF5 reads per row; NaN in caches before version 4
        self.time, self.duration, self.fps = read_times(f)

    def __call__(self, row: int) -> Row:
        size, mtime_ns = (int(self.ident[0][row]), int(self.ident[1][row])) if self.ident else (UNKNOWN, UNKNOWN)
        try:
            features = self.features[row]
        except OSError as exc:  # a row failing its checksum (or unreadable): name the clip, never a traceback
            video = self.file["video"].asstr()[row]
            raise DamagedCacheError(damaged_message(self.file.filename, [video])) from exc
        mask = self.mask[row]
        if len(mask_damage(mask[None], None if self.mask_crc is None else self.mask_crc[row : row + 1])):
            video = self.file["video"].asstr()[row]
            raise DamagedCacheError(damaged_message(self.file.filename, [video], what="frame mask"))
        return Row(
            features,
            mask,
            int(self.label[row]),
            self.split[row],
            int(self.n_frames[row]),
            size,
            mtime_ns,
            self.time[row],
            float(self.duration[row]),
            float(self.fps[row]),
        )


def read_h5_row(f, row: int) -> Row:
    return RowReader(f)(row)


def read_slab(f, source, first: int, last: int) -> np.ndarray:
    """Rows ``first:last`` of the open cache ``f``'s ``features``; a damaged row raises DamagedCacheError naming it."""
    try:
        return source[first:last]
    except OSError as exc:
        for row in range(first, last):
            try:
                source[row]
            except OSError:
                video = f["video"].asstr()[row]
                raise DamagedCacheError(damaged_message(f.filename, [video])) from exc
        raise


def _clips(videos: Sequence[str]) -> str:
    shown = ", ".join(f"'{v}'" for v in videos[:5]) + (f" and {len(videos) - 5} more" if len(videos) > 5 else "")
    return ("clip " if len(videos) == 1 else f"{len(videos)} clips ") + shown


def damaged_message(path, videos: Sequence[str], what: str = "features") -> str:
    """One sentence naming the damaged clips of ``path`` and what to do; ``what``: "features", "frame mask"
    or "frame times"."""
    fails = {
        "features": "fail their checksum",
        "frame times": "do not match their frame mask (one time per real frame, in order)",
    }.get(what, "fail their checksum or are not a valid mask (real frames first)")
    return (
        f"The {what} of {_clips(videos)} in '{path}' {fails}, so the cache file is damaged "
        f"(disk or copy error); re-extract: move '{path}' away and run `featpipe extract` again with the "
        f"same settings (`featpipe info --verify {path}` lists every damaged clip)."
    )


def part_message(path, part: str, why: str, videos: Sequence[str]) -> str:
    """One sentence for a part file of ``path`` that cannot be read, naming the clips it holds."""
    path = Path(path)
    return (
        f"The part file '{path.parent / part}' of '{path}' {why}; it holds the features of {_clips(videos)}. "
        f"Restore it from a backup, or re-extract: move '{path}' and '{parts_dir(path)}' away and run "
        f"`featpipe extract` again with the same settings."
    )


def check_masks(f, path, mask: np.ndarray | None = None) -> None:
    """Raise :class:`DamagedCacheError` naming the clips of the open cache ``f`` whose mask is damaged."""
    mask = f["mask"][()] if mask is None else mask
    bad = mask_damage(mask, f[MASK_CRC][()] if MASK_CRC in f else None)
    if len(bad):
        videos = f["video"].asstr()
        raise DamagedCacheError(damaged_message(path, [videos[int(r)] for r in bad], what="frame mask"))


def part_problems(f, path) -> dict[int, str]:
    """Part files of the open cache ``f`` (at ``path``) that cannot serve its rows: index -> why, as a verb phrase.

    A virtual dataset reads its fill value (NaN) where a source file is missing or cannot be opened,
    so these are found by opening each part, not by reading.
    """
    if "parts" not in f:
        return {}
    path = Path(path)
    names, rows = f["parts/file"].asstr()[:], f["parts/rows"][:]
    tail, dtype = f["features"].shape[1:], f["features"].dtype
    out: dict[int, str] = {}
    for i, name in enumerate(names):
        try:
            with h5py.File(path.parent / name, "r") as part:
                ds = part["features"]
                expected = (int(rows[i]), *tail)
                if ds.shape != expected or ds.dtype != dtype:
                    out[i] = f"holds features of shape {ds.shape} {ds.dtype}, not {expected} {dtype}"
        except FileNotFoundError:
            out[i] = "is missing (it was deleted after the cache was opened)"
        except KeyError:
            out[i] = "holds no features dataset"
        except OSError as exc:
            if isinstance(exc, PermissionError) or "permission denied" in str(exc).lower():
                out[i] = "cannot be read (permission denied)"
            elif not (path.parent / name).exists():
                out[i] = "is missing (it was deleted after the cache was opened)"
            else:
                out[i] = f"is truncated or not a readable HDF5 file ({exc})"
    return out


def part_clips(f, part: int) -> list[str]:
    return [str(v) for v in f["video"].asstr()[()][f["parts/index"][()] == part]]


def _check_fill(f, path, sel, x: np.ndarray) -> None:
    """After a read of rows ``sel`` into ``x``: rows read as the virtual dataset's fill value (NaN) because
    their part file is gone or unreadable are a DamagedCacheError naming the part and its clips, never NaN."""
    if x.dtype.kind != "f" or not x.size or "parts" not in f:
        return
    suspect = np.isnan(x.reshape(len(x), -1)[:, 0])
    if not suspect.any():
        return
    _refuse_unreadable_parts(f, path, np.asarray(_rows_of(sel, len(f["features"])))[suspect])
    # else NaN in the features themselves: refused as such by the finiteness check


def _refuse_unreadable_parts(f, path, rows) -> None:
    """DamagedCacheError naming the part file and its clips when one of ``rows`` lies in a part that cannot be read."""
    if "parts" not in f:
        return
    problems = part_problems(f, path)
    hit = sorted(set(int(i) for i in f["parts/index"][()][np.asarray(rows, dtype=np.int64)]) & set(problems))
    if hit:
        name = f["parts/file"].asstr()[hit[0]]
        raise DamagedCacheError(part_message(path, name, problems[hit[0]], part_clips(f, hit[0])))


def _rows_of(sel, n: int) -> list[int]:
    if isinstance(sel, slice):
        return list(range(*sel.indices(n)))
    return [int(r) for r in np.atleast_1d(np.asarray(sel)).ravel()]


def row_reads(ds, row: int) -> bool:
    try:
        ds[row]
    except OSError:
        return False
    return True


def read_features(f, path, sel, out: np.ndarray | None = None, dest_sel=None) -> np.ndarray:
    """``f["features"][sel]`` (or ``read_direct`` into ``out``), turning a checksum failure into
    :class:`DamagedCacheError` naming the damaged clips among the rows read."""
    ds = f["features"]
    try:
        if out is not None:
            ds.read_direct(out, source_sel=sel, dest_sel=dest_sel)
            _check_fill(f, path, sel, out[dest_sel] if dest_sel is not None else out)
            return out
        x = ds[sel]
        _check_fill(f, path, sel, x)
        return x
    except OSError as exc:
        _refuse_unreadable_parts(f, path, _rows_of(sel, len(ds)))
        bad = [r for r in dict.fromkeys(_rows_of(sel, len(ds))) if not row_reads(ds, r)]
        if not bad:
            raise CacheError(
                f"Reading the features of '{path}' failed ({exc}); check the disk, "
                "or re-extract into a new --output file."
            ) from exc
        videos = f["video"].asstr()
        raise DamagedCacheError(damaged_message(path, [videos[r] for r in bad])) from exc
