"""The HDF5 feature cache's format: schema, attribute keys, the config, clip records and identities.

The format (datasets, attributes, versions 1 to 4, part files, crash safety) is described once,
in docs/cache-format.md. In short: one row per clip (``features``, ``mask``, ``mask_crc32``,
``label``, ``split``, ``video``, ``n_frames``, the kept frames' times ``time`` with the clip's
``duration`` and ``fps``, and the clip's identity ``size`` / ``mtime_ns``),
the clips that failed under ``failed/`` and those dropped under ``stale/``; a cache over
``FEATPIPE_ONE_FILE_MB`` (64 MB) keeps its features in immutable part files in
``<cache>.parts/`` (mapped by ``parts/``), stitched together as an HDF5 virtual dataset.

The package, one job per module: this module (what a cache is), ``journal`` (finished clips
beside a cache being extracted), ``lock`` (one writer; readers keep their part files),
``reader`` (opening, summaries, rows and features, damage named per clip), ``reconcile`` (what
a finalized cache holds, without HDF5), ``writer`` (``CacheWriter``: journal, then finalize),
``parts`` (writing cache and part files), ``shards`` (shard names, merge, compact) and
``verify`` (every row read back).
"""

from __future__ import annotations

import errno
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featpipe.errors import CacheError

SCHEMA_VERSION = 4
# 1: no size/mtime_ns columns and no stale/ group; 2: always one file; 1-3: no time/duration/fps columns
READABLE_VERSIONS = (1, 2, 3, 4)
UNKNOWN = -1  # size / mtime_ns of a row whose identity was never recorded (version 1 caches)

# Attributes that define what the features ARE: everything downstream must agree on them.
PREPROCESSING_KEYS = ("backbone", "weights", "weights_fingerprint", "input_size", "frames", "sampling")
# Attributes that must also match for new clips to be appended to an existing cache.
APPEND_KEYS = PREPROCESSING_KEYS + ("dtype", "feature_shape", "class_names")
# ... and the backbone's arithmetic: features of one cache (or of merged shards) are computed one way.
# Caches from before --precision existed have no such attribute and were computed in float32.
WRITE_KEYS = APPEND_KEYS + ("precision",)


@dataclass(frozen=True)
class CacheConfig:
    """What the features in a cache are: written as attributes, checked on every reuse."""

    backbone: str
    weights: str
    weights_fingerprint: str | None  # None: not known yet, until CacheWriter.settle_fingerprint
    input_size: int
    frames: int
    sampling: str
    dtype: str
    feature_shape: tuple[int, ...]
    class_names: tuple[str, ...]
    extra: dict = field(default_factory=dict, compare=False)  # informational attrs (versions, data root)

    def attrs(self) -> dict:
        out = {
            "schema_version": SCHEMA_VERSION,
            "backbone": self.backbone,
            "weights": self.weights,
            "weights_fingerprint": self.weights_fingerprint,
            "input_size": int(self.input_size),
            "frames": int(self.frames),
            "sampling": self.sampling,
            "dtype": self.dtype,
            "feature_shape": [int(d) for d in self.feature_shape],
            "class_names": list(self.class_names),
        }
        out.update(self.extra)
        return out

    @classmethod
    def from_attrs(cls, attrs: dict) -> "CacheConfig":
        known = {k: attrs[k] for k in APPEND_KEYS if k in attrs}
        missing = [k for k in APPEND_KEYS if k not in attrs]
        if missing:
            raise CacheError(
                f"The cache is missing the attribute(s) {', '.join(missing)}; it was not written by featpipe."
            )
        extra = {k: v for k, v in attrs.items() if k not in APPEND_KEYS and k != "schema_version"}
        return cls(
            backbone=str(known["backbone"]),
            weights=str(known["weights"]),
            weights_fingerprint=str(known["weights_fingerprint"]),
            input_size=int(known["input_size"]),
            frames=int(known["frames"]),
            sampling=str(known["sampling"]),
            dtype=str(known["dtype"]),
            feature_shape=tuple(int(d) for d in np.atleast_1d(known["feature_shape"])),
            class_names=tuple(as_str(c) for c in np.atleast_1d(known["class_names"])),
            extra=extra,
        )

    @property
    def precision(self) -> str:
        """The backbone's compute precision (an informational attribute; float32 when absent)."""
        return str(self.extra.get("precision", "float32"))

    def differences(
        self, other: "CacheConfig", keys=WRITE_KEYS, mine_label: str = "requested", theirs_label: str = "in the cache"
    ) -> list[str]:
        """Human-readable list of the settings that differ, e.g. "frames: 16 requested, 20 in the cache"."""
        out = []
        for key in keys:
            mine, theirs = getattr(self, key), getattr(other, key)
            if mine != theirs:
                out.append(f"{key}: {_show(mine)} {mine_label}, {_show(theirs)} {theirs_label}")
        return out


def _show(value) -> str:
    if isinstance(value, tuple) and len(value) > 6:
        return f"{list(value[:6])}... ({len(value)} items)"
    return str(list(value)) if isinstance(value, tuple) else str(value)


def as_str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class ClipRecord:
    """One clip's outcome: features + mask, or an error reason."""

    video: str
    label: int
    split: str
    n_frames: int
    features: np.ndarray | None = None  # (T, *feature_shape) in the cache dtype
    mask: np.ndarray | None = None  # (T,) bool
    error: str | None = None
    size: int = UNKNOWN  # the clip file's identity when it was read: size in bytes ...
    mtime_ns: int = UNKNOWN  # ... and modification time in ns (UNKNOWN: not recorded)
    times: np.ndarray | None = None  # (T,) float32: each kept frame's time in s from the first frame, NaN padding
    duration: float = float("nan")  # the clip's length in seconds (NaN: not recorded)
    fps: float = float("nan")  # the container's frame rate (0: it reports none; NaN: not recorded)

    @property
    def ok(self) -> bool:
        return self.error is None


# ----------------------------------------------------------------------------- frame times
# Version 4 stores each kept frame's presentation time (``time``, (N, T) float32, NaN on padding) and
# each clip's ``duration`` and ``fps`` ((N,) float32). Rows written before (caches of version 1 to 3,
# journals of an older featpipe) read as NaN: "not recorded".


def padded_times(times, frames: int) -> np.ndarray:
    """``times`` of the kept frames (or None: not recorded) as a (frames,) float32 row, NaN after them."""
    out = np.full(frames, np.nan, dtype=np.float32)
    if times is not None:
        times = np.asarray(times, dtype=np.float32).ravel()[:frames]
        out[: len(times)] = times
    return out


def read_times(f, rows=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(time (N, T), duration (N,), fps (N,)) of an open cache, float32, rows ``rows`` (all by default);
    NaN throughout in a cache written before frame times (versions 1 to 3)."""
    n, t = int(f["label"].shape[0]), int(f["mask"].shape[1]) if f["mask"].ndim == 2 else 0
    if "time" in f and "duration" in f and "fps" in f:
        time, duration, fps = f["time"][()], f["duration"][()], f["fps"][()]
    else:
        time = np.full((n, t), np.nan, dtype=np.float32)
        duration = np.full(n, np.nan, dtype=np.float32)
        fps = np.full(n, np.nan, dtype=np.float32)
    if rows is not None:
        time, duration, fps = time[rows], duration[rows], fps[rows]
    return time.astype(np.float32), duration.astype(np.float32), fps.astype(np.float32)


def time_damage(time: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Rows of an (N, T) ``time`` whose times are recorded (not all NaN) but do not fit the (N, T) ``mask``:
    a time missing on a real frame, one on padding, or times going backwards."""
    time, mask = np.asarray(time, dtype=np.float64), np.asarray(mask).view(np.uint8) != 0
    if time.ndim != 2 or time.shape != mask.shape:
        return np.zeros(0, dtype=np.int64)
    known = ~np.isnan(time)
    recorded = known.any(axis=1)
    bad = (known != mask).any(axis=1) | ~np.isfinite(np.where(known, time, 0.0)).all(axis=1)
    with np.errstate(invalid="ignore"):
        steps = np.diff(np.where(mask, time, np.inf), axis=1)
    bad |= (np.nan_to_num(steps, nan=0.0, posinf=0.0) < 0).any(axis=1)
    return np.flatnonzero(recorded & bad)


# ----------------------------------------------------------------------------- clip identity


Identity = tuple  # (size in bytes, mtime in ns) of a clip file


def file_identity(path) -> Identity | None:
    """(size, mtime_ns) of a clip file now, or None when it cannot be read (it then fails to decode)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return int(st.st_size), int(st.st_mtime_ns)


def _known(size, mtime_ns) -> Identity | None:
    size, mtime_ns = int(size), int(mtime_ns)
    return None if size == UNKNOWN or mtime_ns == UNKNOWN else (size, mtime_ns)


def header_identity(header: dict) -> Identity | None:
    return _known(header.get("size", UNKNOWN), header.get("mtime_ns", UNKNOWN))


def identities(group, n: int) -> list[Identity | None]:
    """The identity column pair of a cache (or its failed/ group); all unknown in a version 1 cache."""
    if "size" not in group or "mtime_ns" not in group:
        return [None] * n
    sizes, mtimes = group["size"][:].tolist(), group["mtime_ns"][:].tolist()  # Python ints, not NumPy scalars
    return [None if s == UNKNOWN or m == UNKNOWN else (s, m) for s, m in zip(sizes, mtimes)]


def strings(f, name: str) -> list[str]:
    return list(f[name].asstr()[:]) if name in f else []


# ----------------------------------------------------------------------------- files beside a cache


def journal_path(cache: Path) -> Path:
    return cache.with_name(cache.name + ".journal")


def lock_path(cache: Path) -> Path:
    return cache.with_name(cache.name + ".lock")


def readers_path(cache: Path) -> Path:
    cache = Path(cache)
    return cache.with_name(cache.name + ".readers")


def parts_dir(cache: str | Path) -> Path:
    """The folder of a cache's part files: ``<cache>.parts`` beside it."""
    cache = Path(cache)
    return cache.with_name(cache.name + ".parts")


# The mask is checksummed per row (``mask_crc32``: zlib.crc32 of the row's bytes, 0 or 1 each),
# and a real mask is always a prefix (True for the real frames, then False): caches written before
# the checksum (no ``mask_crc32``) are checked by that rule alone.
MASK_CRC = "mask_crc32"


def mask_crc32(mask: np.ndarray) -> np.ndarray:
    """Per row of an (N, T) bool mask, zlib.crc32 of its T bytes as stored."""
    raw = np.ascontiguousarray(mask).view(np.uint8)
    return np.fromiter((zlib.crc32(r) for r in raw), dtype=np.uint32, count=len(raw))


def mask_damage(mask: np.ndarray, crc: np.ndarray | None = None) -> np.ndarray:
    """Rows of an (N, T) mask as read that are damaged: a byte not 0 or 1, not a prefix, or (given ``crc``)
    a checksum that does not match."""
    raw = np.ascontiguousarray(mask).view(np.uint8)
    if raw.ndim != 2:
        return np.zeros(0, dtype=np.int64)
    bad = (raw > 1).any(axis=1) | (raw[:, 1:] > raw[:, :-1]).any(axis=1)
    if crc is not None and len(crc) == len(raw):
        bad |= mask_crc32(raw) != np.asarray(crc, dtype=np.uint32)
    return np.flatnonzero(bad)


def write_error(exc: OSError, path: Path, kept: str) -> CacheError:
    """One sentence for an OSError while writing beside ``path``: disk full, read-only folder, or other."""
    code = getattr(exc, "errno", None)
    text = str(exc).lower()
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)) or "no space left" in text or "quota" in text:
        err = CacheError(
            f"The disk holding '{path.parent}' is full; free some space and run the same command again ({kept})."
        )
        err.exit_code = 1
        return err
    if code in (errno.EROFS, errno.EACCES, errno.EPERM) or "read-only" in text or "permission denied" in text:
        return CacheError(
            f"Cannot write to '{path.parent}' ({exc.strerror or exc}); choose a folder you can write "
            f"to with --output ({kept})."
        )
    err = CacheError(f"Writing '{path}' failed ({exc}); fix the cause and run the same command again ({kept}).")
    err.exit_code = 1
    return err
