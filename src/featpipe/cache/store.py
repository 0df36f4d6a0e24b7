"""The HDF5 feature cache: schema, a crash-safe resumable writer, and a validating reader.

Schema (version 3), readable with plain h5py and pandas:

  features        (N, T, *feature_shape)  float16 (default) or float32; one clip per chunk
  mask            (N, T)  bool            True exactly for real (not padded) frames: always a prefix
  mask_crc32      (N,)    uint32          zlib.crc32 of each row's mask bytes (absent in older caches:
                                          their masks are checked by the prefix rule alone)
  label           (N,)    int             index into attrs["class_names"]
  split           (N,)    str             train / val / test
  video           (N,)    str             clip path relative to the data root (the clip's key)
  n_frames        (N,)    int             frames in the whole clip
  size            (N,)    int             the clip file's size in bytes when it was extracted ...
  mtime_ns        (N,)    int             ... and its modification time (ns): the clip's identity
  failed/video    (F,)    str             clips that could not be used ...
  failed/reason   (F,)    str             ... and why
  failed/size, failed/mtime_ns (F,) int   their identity (a changed file is tried again)
  stale/video     (S,)    str             rows dropped because their clip left the dataset ...
  stale/reason    (S,)    str             ... and why (names only; their features are gone)
  attrs: schema_version, backbone, weights, weights_fingerprint, input_size, frames, sampling,
         class_names, dtype, feature_shape, featpipe_version, keras_version, keras_backend,
         data_root, layout

Version 1 caches (no identity columns, no stale/ group) are still read; their rows have an
unknown identity (-1), which the next extraction trusts and replaces by the clip's current one.
Version 2 caches are version 3 caches written as one file.

Part files (version 3). A cache whose features exceed ``FEATPIPE_ONE_FILE_MB`` (64 MB by
default) keeps them in immutable part files in the folder ``<cache>.parts/`` beside it, and
``features`` is an HDF5 virtual dataset stitching them together (plain h5py reads it like any
dataset). The cache file also holds

  parts/file      (P,)    str             part files, relative to the cache's folder
  parts/rows      (P,)    int             rows in each part file
  parts/index     (N,)    int             the part file holding each row's features ...
  parts/row       (N,)    int             ... and the row there

A part file holds one ``features`` dataset (one clip per chunk, fletcher32 checksums); an old
whole cache (or shard) can serve as a part as it is. Adding k clips writes one new part of k
rows and rewrites only the small columns, so it costs O(k) in features; merging shards
hard-links their parts (or whole files) into the merged cache's ``.parts/`` folder. Rows are
then ordered by part (kept rows first, in their old order; new rows after, sorted by key), not
globally by key; a cache written as one file (small caches, ``compact``) is sorted by key.
Part files that the cache no longer references (rows dropped, a killed write) are removed by
the next write under the cache's lock, once no reader holds a cache file that names them (see
"readers" below).

Crash safety. The HDF5 file is never modified in place. While extracting, every finished clip
is appended to a journal beside the cache (``<cache>.journal``) as one checksummed record; a
record torn by a kill fails its checksum and is dropped on the next open. At the end the new
rows go into a new part file (or, for a one-file cache, old rows + journal rows are rewritten in
key order), a new cache file is written beside the old one and atomically replaces it, and only
then is the journal removed; part files a killed finalize left unreferenced are removed by the
next writer. So a SIGKILL at any moment loses
at most the clips in flight, and the next run resumes from cache + journal and ends with the
same cache a clean run produces. An exclusive lock (``<cache>.lock``, released by the OS when
the process dies) stops two extractions from writing one cache at once.

Shards. ``extract --shard I/N`` writes the clips whose key hashes to I (of N) into
``<stem>.shard-I-of-N<suffix>`` beside the cache, with its own journal and lock; every shard
records the full dataset's class names. ``merge_shards`` checks that a set is complete,
finished and made with one set of settings, and writes the cache an unsharded run would have
written, atomically: one file (rows sorted by clip key, copied one clip at a time) when small or
asked to compact, else the shards' part files hard-linked under the output's ``.parts/``.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import itertools
import json
import os
import re
import shutil
import struct
import time
import uuid
import zlib
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import h5py
import numpy as np

from featpipe.errors import CacheError, FeatpipeError
from featpipe.names import SPLITS
from featpipe.options import as_paths, check_file_option

SCHEMA_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # 1: no size/mtime_ns columns and no stale/ group; 2: always one file
UNKNOWN = -1  # size / mtime_ns of a row whose identity was never recorded (version 1 caches)

# Attributes that define what the features ARE: everything downstream must agree on them.
PREPROCESSING_KEYS = ("backbone", "weights", "weights_fingerprint", "input_size", "frames", "sampling")
# Attributes that must also match for new clips to be appended to an existing cache.
APPEND_KEYS = PREPROCESSING_KEYS + ("dtype", "feature_shape", "class_names")
# ... and the backbone's arithmetic: features of one cache (or of merged shards) are computed one way.
# Caches from before --precision existed have no such attribute and were computed in float32.
WRITE_KEYS = APPEND_KEYS + ("precision",)

_JOURNAL_MAGIC = b"FEATPIPE-JOURNAL-1\n"
_RECORD_MAGIC = b"FPR1"
_RECORD_HEAD = struct.Struct("<4sII")  # magic, header length, payload length
_CRC = struct.Struct("<I")


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
            class_names=tuple(_as_str(c) for c in np.atleast_1d(known["class_names"])),
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


def _as_str(value) -> str:
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

    @property
    def ok(self) -> bool:
        return self.error is None


# ----------------------------------------------------------------------------- journal


def journal_path(cache: Path) -> Path:
    return cache.with_name(cache.name + ".journal")


def lock_path(cache: Path) -> Path:
    return cache.with_name(cache.name + ".lock")


def _encode_record(rec: ClipRecord, config: CacheConfig) -> bytes:
    header = {
        "video": rec.video,
        "label": int(rec.label),
        "split": rec.split,
        "n_frames": int(rec.n_frames),
        "size": int(rec.size),
        "mtime_ns": int(rec.mtime_ns),
    }
    if rec.ok:
        features = np.ascontiguousarray(rec.features, dtype=config.dtype)
        expected = (config.frames, *config.feature_shape)
        if features.shape != expected:
            raise ValueError(f"features of shape {features.shape}, expected {expected}")
        payload = features.tobytes() + np.ascontiguousarray(rec.mask, dtype=bool).tobytes()
    else:
        header["error"] = rec.error
        payload = b""
    head = json.dumps(header, ensure_ascii=False).encode()
    body = head + payload
    return _RECORD_HEAD.pack(_RECORD_MAGIC, len(head), len(payload)) + body + _CRC.pack(zlib.crc32(body))


@dataclass
class _JournalEntry:
    header: dict
    offset: int  # file offset of the payload
    length: int  # payload length


def _read_journal(path: Path) -> tuple[dict | None, list[_JournalEntry], int]:
    """Return (config attrs, valid entries, offset just past the last valid record).

    A missing/torn header gives (None, [], 0); a torn or corrupt record ends the valid part.
    """
    entries: list[_JournalEntry] = []
    with open(path, "rb") as fh:
        magic = fh.read(len(_JOURNAL_MAGIC))
        raw_len = fh.read(4)
        if magic != _JOURNAL_MAGIC or len(raw_len) < 4:
            return None, [], 0
        (n,) = struct.unpack("<I", raw_len)
        raw = fh.read(n)
        crc = fh.read(4)
        if len(raw) < n or len(crc) < 4 or _CRC.unpack(crc)[0] != zlib.crc32(raw):
            return None, [], 0
        attrs = json.loads(raw)
        good_end = fh.tell()
        while True:
            head = fh.read(_RECORD_HEAD.size)
            if len(head) < _RECORD_HEAD.size:
                break
            magic, hlen, plen = _RECORD_HEAD.unpack(head)
            if magic != _RECORD_MAGIC:
                break
            body = fh.read(hlen + plen)
            crc = fh.read(4)
            if len(body) < hlen + plen or len(crc) < 4 or _CRC.unpack(crc)[0] != zlib.crc32(body):
                break
            try:
                header = json.loads(body[:hlen])
            except ValueError:
                break
            entries.append(_JournalEntry(header, good_end + _RECORD_HEAD.size + hlen, plen))
            good_end = fh.tell()
    return attrs, entries, good_end


class JournalWriter:
    """Appends finished clips to the journal; each record is written in one call and flushed."""

    def __init__(self, path: Path, config: CacheConfig, fsync_every: int = 16):
        self.path = path
        self.config = config
        self.fsync_every = fsync_every
        self._since_sync = 0
        if not path.exists():
            raw = json.dumps(config.attrs(), ensure_ascii=False).encode()
            tmp = path.with_name(path.name + ".new")
            with open(tmp, "wb") as fh:
                fh.write(_JOURNAL_MAGIC + struct.pack("<I", len(raw)) + raw + _CRC.pack(zlib.crc32(raw)))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        self._fh = open(path, "ab", buffering=0)

    def append(self, rec: ClipRecord) -> None:
        self._fh.write(_encode_record(rec, self.config))
        self._since_sync += 1
        if self._since_sync >= self.fsync_every:
            os.fsync(self._fh.fileno())
            self._since_sync = 0

    def close(self) -> None:
        if not self._fh.closed:
            os.fsync(self._fh.fileno())
            self._fh.close()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- lock


class CannotWrite(CacheError):
    """The cache's folder cannot be written (read-only media, no permission): the lock file cannot be made."""


class CacheLock:
    """Exclusive, non-blocking lock on ``<cache>.lock``; the OS releases it if the process dies."""

    def __init__(self, cache: Path):
        self.path = lock_path(cache)
        self._fh = None

    def __enter__(self) -> "CacheLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a+")
        except OSError as exc:
            err = write_error(exc, self.path, "nothing was changed")
            raise (CannotWrite(str(err)) if err.exit_code == 2 else err) from None
        try:
            import fcntl

            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # Windows
            import msvcrt

            try:
                msvcrt.locking(self._fh.fileno(), msvcrt.LK_NBLCK, 1)
            except OSError:
                self._refuse()
        except OSError:
            self._refuse()
        return self

    def _refuse(self):
        self._fh.close()
        self._fh = None
        raise CacheError(
            f"Another featpipe extraction is writing '{self.path.name[:-5]}' right now. Wait for it to finish, "
            f"or write to another file with --output."
        )

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the descriptor releases the lock
            self._fh = None


# ----------------------------------------------------------------------------- readers
# A command reading a cache kept in part files (train --stream, evaluate, tune, info --verify) holds
# the file it opened for as long as it reads, and that file's virtual dataset opens its part files by
# name on every read. A writer that replaced the cache (extract, merge --force, --compact) must not
# delete the part files the old file still names while such a reader runs: HDF5 would read NaN there.
# So readers register with a shared flock on ``<cache>.readers`` (released by the OS if they die),
# and part files the cache no longer references are deleted only under an exclusive, non-blocking
# lock on it; while a reader holds it they stay, and the next write that finds no reader removes them.


def readers_path(cache: Path) -> Path:
    cache = Path(cache)
    return cache.with_name(cache.name + ".readers")


def _flock(fh, mode: str, block: bool = False) -> bool:
    """flock ``fh`` shared ("sh") or exclusive ("ex"); False where it is held elsewhere (or cannot be taken)."""
    try:
        import fcntl
    except ImportError:  # Windows: an open file cannot be deleted there anyway
        return mode == "sh"
    flags = fcntl.LOCK_SH if mode == "sh" else fcntl.LOCK_EX
    try:
        fcntl.flock(fh.fileno(), flags if block else flags | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _open_readers_file(cache: Path):
    path = readers_path(cache)
    try:
        return open(path, "a+b")
    except OSError:
        try:
            return open(path, "rb")  # a read-only folder: no writer can delete parts there either
        except OSError:
            return None


class _Reader:
    """This process's registration as a reader of a cache in part files (a shared lock on ``<cache>.readers``)."""

    def __init__(self, fh):
        self._fh = fh

    @classmethod
    def register(cls, cache: Path) -> "_Reader | None":
        fh = _open_readers_file(cache)
        if fh is None:
            return None
        # a writer holds the exclusive lock only while it deletes unused part files: wait for that (bounded)
        for _ in range(400):
            if _flock(fh, "sh"):
                return cls(fh)
            time.sleep(0.025)
        fh.close()
        return None

    def release(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()  # closing the descriptor releases the lock


@contextmanager
def _no_readers(cache: Path) -> Iterator[bool]:
    """True inside while no process reads ``cache`` (an exclusive lock on ``<cache>.readers``), else False."""
    fh = _open_readers_file(cache)
    if fh is None:
        yield True
        return
    try:
        yield _flock(fh, "ex")
    finally:
        fh.close()


class _CacheFile(h5py.File):
    """A cache opened by :func:`open_h5`: closing it also ends its reader registration."""

    _reader: _Reader | None = None

    def close(self):
        try:
            super().close()
        finally:
            reader, self._reader = self._reader, None
            if reader is not None:
                reader.release()


# ----------------------------------------------------------------------------- shards

_SHARD_SPEC = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")
_SHARD_NAME = re.compile(r"(?P<stem>.+)\.shard-(?P<index>\d+)-of-(?P<count>\d+)(?P<suffix>\.[^.]*)?")


def parse_shard(spec: str) -> tuple[int, int]:
    """``"2/4"`` -> (2, 4): the 1-based shard index and the number of shards."""
    m = _SHARD_SPEC.fullmatch(str(spec))
    if not m or not 1 <= int(m[1]) <= int(m[2]):
        raise FeatpipeError(f"--shard must look like I/N with 1 <= I <= N, e.g. 2/4; got '{spec}'.")
    return int(m[1]), int(m[2])


def shard_of(key: str, count: int) -> int:
    """The shard (1..count) a clip key belongs to: a SHA-1 of the key, so the same on every
    machine and in every process, whatever other clips exist."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % count + 1


def shard_path(cache: Path, index: int, count: int) -> Path:
    """``cache/vgg16.h5`` -> ``cache/vgg16.shard-2-of-4.h5``."""
    cache = Path(cache)
    return cache.with_name(f"{cache.stem}.shard-{index}-of-{count}{cache.suffix}")


def parse_shard_path(path: Path) -> tuple[Path, int, int] | None:
    """``cache/vgg16.shard-2-of-4.h5`` -> (``cache/vgg16.h5``, 2, 4); None for a name that is not a shard's."""
    path = Path(path)
    m = _SHARD_NAME.fullmatch(path.name)
    if m is None:
        return None
    return path.with_name(m["stem"] + (m["suffix"] or "")), int(m["index"]), int(m["count"])


# ----------------------------------------------------------------------------- reading


def read_config(path: Path) -> CacheConfig:
    """Open a finished cache just long enough to validate and return its config."""
    with open_h5(path) as f:
        return CacheConfig.from_attrs(dict(f.attrs))


def open_h5(path: Path):
    """Open a cache read-only, turning every way it can be wrong into one CacheError sentence.

    A cache kept in part files is registered as read (see "readers" above) until the file is
    closed: part files it names are not deleted while it is open, whatever replaces the cache.
    """
    path = Path(path)
    f = _open_cache_file(path)
    if "parts" not in f:
        return f
    reader = _Reader.register(path)
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

    def lines(self) -> list[str]:
        c = self.config
        shard = (
            f" (shard {_as_str(c.extra['shard'])}; combine the shards with `featpipe merge`)"
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
        failed = list(zip(_strings(f, "failed/video"), _strings(f, "failed/reason")))
        stale = list(zip(_strings(f, "stale/video"), _strings(f, "stale/reason")))
        parts = len(f["parts/file"]) if "parts" in f else 0
        return CacheSummary(
            path, config, len(labels), len(failed), counts, failed, int(f["mask"][:].sum()), stale, parts
        )


# ----------------------------------------------------------------------------- writing


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


def _header_identity(header: dict) -> Identity | None:
    return _known(header.get("size", UNKNOWN), header.get("mtime_ns", UNKNOWN))


def _identities(group, n: int) -> list[Identity | None]:
    """The identity column pair of a cache (or its failed/ group); all unknown in a version 1 cache."""
    if "size" not in group or "mtime_ns" not in group:
        return [None] * n
    sizes, mtimes = group["size"][:].tolist(), group["mtime_ns"][:].tolist()  # Python ints, not NumPy scalars
    return [None if s == UNKNOWN or m == UNKNOWN else (s, m) for s, m in zip(sizes, mtimes)]


def _strings(f, name: str) -> list[str]:
    return list(f[name].asstr()[:]) if name in f else []


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


class CacheWriter:
    """Resumable writer for one cache file. Use under ``CacheLock``.

    ``done`` lists the clip keys already extracted (cache + journal); ``failed`` those recorded
    as unusable; ``identity(key)`` the (size, mtime_ns) each was read with. ``append`` journals
    a clip (stamped with ``identities[key]`` when it carries none); ``finalize`` folds
    everything into the HDF5 file. ``writable=False`` only reads (a cache on read-only media).

    ``config.weights_fingerprint`` may be None, not known yet (--engine ray computes it while the
    cluster starts): the cache and journal are then checked on every other setting at once, and
    on the fingerprint by :meth:`settle_fingerprint`, which must come before ``append`` or ``finalize``.
    """

    def __init__(self, path: Path, config: CacheConfig, writable: bool = True):
        self.path = Path(path)
        self.config = config
        self.journal = journal_path(self.path)
        if writable:
            _remove_stale_temporaries(self.path)  # a finalize killed before its rename; the old cache is intact
        self._existing: dict[str, int] = {}  # key -> row in the existing cache
        self._existing_failed: dict[str, str] = {}
        self._existing_identity: dict[str, Identity | None] = {}  # rows and failed clips
        self._existing_stale: dict[str, str] = {}
        self.existing_attrs: dict | None = None  # the cache's (or else the journal's) attributes
        self._checked: list[tuple[CacheConfig, str]] = []  # what opening checked the config against
        if self.path.exists():
            with open_h5(self.path) as f:
                self.existing_attrs = dict(f.attrs)
                theirs = CacheConfig.from_attrs(self.existing_attrs)
                self._check(theirs, f"the existing cache '{self.path}'")
                keys = list(f["video"].asstr()[:])
                self._existing = dict(zip(keys, range(len(keys))))
                self._existing_identity = dict(zip(keys, _identities(f, len(keys))))
                failed_keys = _strings(f, "failed/video")
                self._existing_failed = dict(zip(failed_keys, _strings(f, "failed/reason")))
                if "failed" in f:
                    self._existing_identity.update(zip(failed_keys, _identities(f["failed"], len(failed_keys))))
                self._existing_stale = dict(zip(_strings(f, "stale/video"), _strings(f, "stale/reason")))
        if writable:
            _collect_parts(self.path)  # part files of a finalize killed before its rename, or of dropped rows
        self._journal_entries: dict[str, _JournalEntry] = {}
        if self.journal.exists():
            attrs, entries, end = _read_journal(self.journal)
            if attrs is None:
                if writable:
                    self.journal.unlink()  # killed while creating the journal: nothing in it
            else:
                self._check(CacheConfig.from_attrs(attrs), f"the unfinished extraction '{self.journal}'")
                if self.existing_attrs is None:
                    self.existing_attrs = attrs
                if writable:
                    with open(self.journal, "r+b") as fh:
                        fh.truncate(end)  # drop a torn tail record
                for entry in entries:
                    self._journal_entries.pop(entry.header["video"], None)
                    self._journal_entries[entry.header["video"]] = entry  # a later record wins
        self._appended: dict[str, dict] = {}  # headers of the records this process journalled
        self.identities: dict[str, Identity | None] = {}  # current identity per key, stamped by append
        self.n_dropped = 0  # rows the last finalize dropped because their clip left the dataset
        self.n_changed = 0  # ... because their clip's file changed and was not extracted again
        self._writer: JournalWriter | None = None

    def _check(self, theirs: CacheConfig, what: str) -> None:
        self._checked.append((theirs, what))
        keys = (
            WRITE_KEYS
            if self.config.weights_fingerprint is not None
            else tuple(k for k in WRITE_KEYS if k != "weights_fingerprint")
        )
        diffs = self.config.differences(theirs, keys)
        if diffs:
            raise CacheError(
                f"Refusing to add clips to {what}: it was made with different settings ({'; '.join(diffs)}). "
                f"Use the same settings, or write a new cache with --output FILE."
            )

    def settle_fingerprint(self, fingerprint: str) -> None:
        """Give a writer opened without it its weights fingerprint, checked against the cache and the
        journal as opening checks every other setting (the same CacheError when they differ)."""
        checked, self._checked = self._checked, []
        self.config = dataclasses.replace(self.config, weights_fingerprint=fingerprint)
        for theirs, what in checked:
            self._check(theirs, what)

    def _settled(self) -> None:
        if self.config.weights_fingerprint is None:
            raise RuntimeError("CacheWriter: settle_fingerprint() must come before anything is written")

    def _latest(self) -> dict[str, tuple[str | None, Identity | None]]:
        """key -> (None for a row or the failure reason, identity): the cache, then the journal, later wins."""
        out: dict[str, tuple[str | None, Identity | None]] = {}
        for key in self._existing:
            out[key] = (None, self._existing_identity.get(key))
        for key, reason in self._existing_failed.items():
            if key not in out:
                out[key] = (reason, self._existing_identity.get(key))
        for header in [e.header for e in self._journal_entries.values()] + list(self._appended.values()):
            out.pop(header["video"], None)
            out[header["video"]] = (header.get("error"), _header_identity(header))
        return out

    @property
    def done(self) -> set[str]:
        return {k for k, (error, _) in self._latest().items() if error is None}

    @property
    def failed(self) -> dict[str, str]:
        return {k: error for k, (error, _) in self._latest().items() if error is not None}

    def identity(self, key: str) -> Identity | None:
        """The (size, mtime_ns) clip ``key`` was extracted (or failed) with; None if unknown or absent."""
        return self._latest().get(key, (None, None))[1]

    def contents(self) -> dict[str, Identity | None]:
        """Every clip key the cache and journal know (rows and failures) -> its recorded identity."""
        return {k: ident for k, (_, ident) in self._latest().items()}

    def standing(self, current: dict[str, Identity | None]) -> tuple[set[str], set[str]]:
        """(rows, failures) recorded for clips of ``current`` (key -> identity now) that still stand: the
        identity they were recorded with is the file's now, or was never recorded (a version 1 cache). What a
        run reuses instead of doing again; one pass over what the cache and journal hold."""
        rows: set[str] = set()
        failures: set[str] = set()
        for key, (error, ident) in self._latest().items():
            if key in current and (ident is None or ident == current[key]):
                (rows if error is None else failures).add(key)
        return rows, failures

    @property
    def pending(self) -> bool:
        """True when the journal holds clips not yet folded into the HDF5 file."""
        return bool(self._journal_entries) or bool(self._appended)

    def append(self, rec: ClipRecord) -> None:
        self._settled()
        if rec.size == UNKNOWN and self.identities.get(rec.video):
            rec = dataclasses.replace(rec, size=self.identities[rec.video][0], mtime_ns=self.identities[rec.video][1])
        try:
            if self._writer is None:
                self._writer = JournalWriter(self.journal, self.config)
            self._writer.append(rec)
        except OSError as exc:
            raise write_error(exc, self.journal, "the clips finished so far are kept") from None
        header = {"video": rec.video, "size": int(rec.size), "mtime_ns": int(rec.mtime_ns)}
        if not rec.ok:
            header["error"] = rec.error
        self._appended.pop(rec.video, None)
        self._appended[rec.video] = header

    def close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close()
            except OSError as exc:
                raise write_error(exc, self.journal, "the clips finished so far are kept") from None

    def finalize(
        self, assignments: dict[str, tuple[int, str]] | None = None, current: dict[str, Identity | None] | None = None
    ) -> Path:
        """Write cache + journal into a new HDF5 file, atomically replace the cache, drop the journal.

        ``assignments`` maps clip key -> (label, split) from the current dataset index, so that
        re-splitting never needs re-extraction; clips not in it keep what they had.
        ``current`` maps every clip key of the current dataset (or shard) -> its identity now:
        rows whose clip is not in it, or whose file changed since it was extracted, are dropped
        (and listed under stale/); rows of unknown identity (version 1) take the current one.
        """
        self._settled()
        self.close()
        if self.journal.exists():  # re-read: includes what this process appended
            _, entries, _ = _read_journal(self.journal)
            self._journal_entries = {}
            for e in entries:
                self._journal_entries.pop(e.header["video"], None)
                self._journal_entries[e.header["video"]] = e
        self._appended = {}
        assignments = assignments or {}
        c = self.config
        rows: dict[str, tuple[str, object]] = {}  # key -> (source, handle)
        ident: dict[str, Identity | None] = {}
        for key, row in self._existing.items():
            rows[key] = ("h5", row)
            ident[key] = self._existing_identity.get(key)
        failed = {k: v for k, v in self._existing_failed.items() if k not in rows}
        for key in failed:
            ident[key] = self._existing_identity.get(key)
        for key, entry in self._journal_entries.items():  # later than the cache: a journal record wins
            ident[key] = _header_identity(entry.header)
            if "error" in entry.header:
                rows.pop(key, None)
                failed[key] = entry.header["error"]
            else:
                rows[key] = ("journal", entry)
                failed.pop(key, None)
        stale = dict(self._existing_stale)
        self.n_dropped = self.n_changed = 0
        if current is not None:
            for key in list(rows):
                now = current.get(key) if key in current else None
                if key not in current:
                    stale[key] = "no longer in the dataset"
                    self.n_dropped += 1
                elif ident[key] is not None and now is not None and ident[key] != now:
                    stale[key] = "its file changed after it was extracted"
                    self.n_changed += 1
                else:
                    if ident[key] is None:
                        ident[key] = now  # a version 1 row: trusted, identified from now on
                    continue
                del rows[key]
            failed = {k: v for k, v in failed.items() if k in current}
        stale = {k: v for k, v in stale.items() if k not in rows}
        keys = sorted(rows)
        failed_keys = sorted(failed)
        feat_bytes = int(np.prod((c.frames, *c.feature_shape))) * np.dtype(c.dtype).itemsize

        def unknown(key):
            return ident.get(key) or (UNKNOWN, UNKNOWN)

        try:
            with ExitStack() as stack:
                old = stack.enter_context(open_h5(self.path)) if self._existing else None
                old_row = _RowReader(old) if old is not None else None
                jf = stack.enter_context(open(self.journal, "rb")) if self.journal.exists() else None

                def read_row(key: str) -> _Row:
                    source, handle = rows[key]
                    if source == "h5":
                        row = old_row(handle)
                    else:
                        jf.seek(handle.offset)
                        payload = jf.read(handle.length)
                        features = np.frombuffer(payload[:feat_bytes], dtype=c.dtype)
                        features = features.reshape(c.frames, *c.feature_shape)
                        row = _Row(
                            features,
                            np.frombuffer(payload[feat_bytes:], dtype=bool),
                            int(handle.header["label"]),
                            handle.header["split"],
                            int(handle.header["n_frames"]),
                        )
                    size, mtime_ns = unknown(key)
                    row = dataclasses.replace(row, size=size, mtime_ns=mtime_ns)
                    if key in assignments:
                        row = dataclasses.replace(row, label=int(assignments[key][0]), split=assignments[key][1])
                    return row

                failed_identity = {k: unknown(k) for k in failed_keys}
                order = keys  # the rows as written
                if len(keys) * feat_bytes <= _one_file_limit():
                    tmp = self._write_one_file(
                        old, keys, rows, read_row, unknown, assignments, failed, failed_identity, stale
                    )
                else:  # O(new clips): old rows stay where they are, new ones go into one new part file
                    kept = sorted((k for k in keys if rows[k][0] == "h5"), key=lambda k: rows[k][1])
                    new = [k for k in keys if rows[k][0] == "journal"]
                    order = kept + new
                    tmp = self._write_parts(
                        old,
                        kept,
                        [rows[k][1] for k in kept],
                        new,
                        read_row,
                        unknown,
                        assignments,
                        failed,
                        failed_identity,
                        stale,
                    )
            _install(tmp, self.path)  # after the old cache is closed (Windows cannot replace an open file)
            _collect_parts(self.path)
        except OSError as exc:
            kept = (
                "the old cache and the clips finished since are kept"
                if self.path.exists()
                else "the clips finished so far are kept"
            )
            raise write_error(exc, self.path, kept) from None
        if self.journal.exists():
            self.journal.unlink()
        self._existing = {k: i for i, k in enumerate(order)}  # a cache in part files keeps old rows first
        self._existing_failed = {k: failed[k] for k in failed_keys}
        self._existing_identity = {k: ident.get(k) for k in keys + failed_keys}
        self._existing_stale = stale
        self._journal_entries = {}
        return self.path

    def _write_one_file(self, old, keys, rows, read_row, identity, assignments, failed, failed_identity, stale) -> Path:
        """The cache as one file (rows by key): what ``_write_temporary`` writes, with the old rows' features
        copied in slabs and their small columns read whole (a Python call per row cost ~1 ms per old row:
        adding 10 clips to a 20,000-row cache took 20 s); the journal's rows are read one by one."""
        c = self.config
        n = len(keys)
        at = np.array([rows[k][1] if rows[k][0] == "h5" else -1 for k in keys], dtype=np.int64)
        mine = np.flatnonzero(at >= 0)  # rows copied from the old cache, at rows at[mine] there
        cols = _Columns.read(old, at[mine], keys=[keys[i] for i in mine]) if len(mine) else None
        mask = np.zeros((n, c.frames), dtype=bool)
        labels, n_frames = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        splits: list = [""] * n
        if cols is not None:
            mask[mine], labels[mine], n_frames[mine] = cols.mask, cols.label, cols.n_frames
            for i, sp in zip(mine.tolist(), cols.split):
                splits[i] = sp
        fresh: dict[int, np.ndarray] = {}
        for i in np.flatnonzero(at < 0).tolist():
            row = read_row(keys[i])  # a journal row: identity and assignment applied
            fresh[i] = row.features
            mask[i], labels[i], n_frames[i], splits[i] = row.mask, row.label, row.n_frames, row.split
        for i, key in enumerate(keys):
            if key in assignments:
                labels[i], splits[i] = int(assignments[key][0]), assignments[key][1]
        idents = [identity(key) for key in keys]
        sizes = np.array([x[0] for x in idents], dtype=np.int64)
        mtimes = np.array([x[1] for x in idents], dtype=np.int64)
        columns = (mask, labels, splits, n_frames, sizes, mtimes)
        return _write_one_file_temporary(self.path, c, keys, old, at, fresh, *columns, failed, failed_identity, stale)

    def _write_parts(
        self,
        old,
        kept: list[str],
        kept_rows: list[int],
        new: list[str],
        read_row,
        identity,
        assignments,
        failed,
        failed_identity,
        stale,
    ) -> Path:
        """The cache as old rows ``kept`` (read where they are) + ``new`` rows in one new part; return the temporary."""
        c = self.config
        pieces: list[_Columns] = []
        src = _Sources([], [], np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
        if kept:
            at = np.asarray(kept_rows, dtype=np.int64)
            # the keys are known (row at[i] holds kept[i]), and so are the splits when every row has an
            # assignment: not read back and decoded one string per row
            assigned = all(key in assignments for key in kept)
            cols = _Columns.read(old, at, keys=kept, splits=[assignments[k][1] for k in kept] if assigned else None)
            idents = [identity(key) for key in kept]
            cols.size = np.array([i[0] for i in idents], dtype=np.int64)
            cols.mtime_ns = np.array([i[1] for i in idents], dtype=np.int64)
            if assigned:
                cols.label = np.array([assignments[k][0] for k in kept], dtype=np.int64)
            else:
                for i, key in enumerate(kept):
                    if key in assignments:
                        cols.label[i], cols.split[i] = int(assignments[key][0]), assignments[key][1]
            pieces.append(cols)
            whole = _sources_of(old, self.path)
            src = _Sources(whole.files, whole.rows, whole.index[at], whole.row[at])
        if new:
            fresh = _Columns(
                [],
                np.zeros((len(new), c.frames), dtype=bool),
                np.zeros(len(new), dtype=np.int64),
                [],
                np.zeros(len(new), dtype=np.int64),
                np.zeros(len(new), dtype=np.int64),
                np.zeros(len(new), dtype=np.int64),
            )

            def features():
                for i, key in enumerate(new):
                    row = read_row(key)
                    fresh.keys.append(key)
                    fresh.split.append(row.split)
                    fresh.mask[i], fresh.label[i], fresh.n_frames[i] = row.mask, row.label, row.n_frames
                    fresh.size[i], fresh.mtime_ns[i] = row.size, row.mtime_ns
                    yield row.features

            # parts of at most _PART_BYTES, each built in memory (see _h5_create): HDF5 never meets a full disk
            per_part = max(1, _PART_BYTES // _row_bytes(c))
            rows = features()
            for first in range(0, len(new), per_part):
                count = min(per_part, len(new) - first)
                part = _write_part(parts_dir(self.path), c, count, itertools.islice(rows, count))
                src = _Sources(
                    src.files + [part],
                    src.rows + [count],
                    np.concatenate([src.index, np.full(count, len(src.files), dtype=np.int64)]),
                    np.concatenate([src.row, np.arange(count, dtype=np.int64)]),
                )
            pieces.append(fresh)
        return _write_parted_temporary(
            self.path, c, _Columns.concat(pieces, c.frames), src, failed, failed_identity, stale
        )


@dataclass(frozen=True)
class _Row:
    """One clip's row of a cache, as read from a cache, a journal or a shard."""

    features: np.ndarray  # (T, *feature_shape)
    mask: np.ndarray  # (T,) bool
    label: int
    split: str
    n_frames: int
    size: int = UNKNOWN  # the clip's identity (UNKNOWN in version 1 caches)
    mtime_ns: int = UNKNOWN


class _RowReader:
    """Reads rows of an open cache one at a time, holding its datasets open (opening a virtual
    dataset opens its part files: once per reader, not once per row)."""

    def __init__(self, f):
        self.file = f
        self.features, self.mask, self.label, self.n_frames = f["features"], f["mask"], f["label"], f["n_frames"]
        self.split = f["split"].asstr()
        self.ident = (f["size"], f["mtime_ns"]) if "size" in f and "mtime_ns" in f else None
        self.mask_crc = f[MASK_CRC][()] if MASK_CRC in f else None

    def __call__(self, row: int) -> _Row:
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
        return _Row(features, mask, int(self.label[row]), self.split[row], int(self.n_frames[row]), size, mtime_ns)


def _read_h5_row(f, row: int) -> _Row:
    return _RowReader(f)(row)


def _remove_stale_temporaries(path: Path) -> None:
    """Drop what a write killed before its rename left beside ``path`` (the old file is intact)."""
    for stale in path.parent.glob(path.name + ".tmp-*"):
        stale.unlink()


@contextmanager
def _whole_or_nothing(path: Path):
    """Write ``path`` inside the block; on success fsync it, on any failure (a full disk, Ctrl-C) remove it."""
    try:
        yield path
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


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


def _write_temporary(
    path: Path,
    config: CacheConfig,
    keys: list[str],
    read_row: Callable[[str], _Row],
    failed: dict[str, str],
    failed_identity: dict[str, Identity] | None = None,
    stale: dict[str, str] | None = None,
    in_memory: bool = False,
) -> Path:
    """Write a complete cache into a temporary file beside ``path``, fsync it and return it.

    ``in_memory`` (a size known to be bounded): HDF5 builds the file in memory and Python writes its bytes,
    so a full disk is an OSError here, after HDF5 has closed the file cleanly. (HDF5 meeting ENOSPC itself
    cannot close the file: its handles then crash the interpreter when they are freed, or at exit.)

    ``keys`` (sorted) become the rows, read one clip at a time with ``read_row``, so memory stays
    bounded whatever the cache size; ``failed`` maps clip key -> reason. ``_install`` then puts
    it in place. Used by ``CacheWriter.finalize`` and ``merge_shards``. ``failed_identity``
    maps failed keys -> (size, mtime_ns); ``stale`` maps dropped clip keys -> why.
    """
    c = config
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    n, t = len(keys), c.frames
    with _whole_or_nothing(tmp):
        with _h5_create(tmp, in_memory) as out:
            for k, v in c.attrs().items():
                out.attrs[k] = v
            # fletcher32: a checksum per chunk (one row), checked by HDF5 on every read, transparent to
            # plain h5py readers; a damaged row then fails to read instead of reading as wrong numbers
            feats = out.create_dataset(
                "features",
                shape=(n, t, *c.feature_shape),
                dtype=c.dtype,
                chunks=(1, t, *c.feature_shape) if n else None,
                fletcher32=True,
            )
            labels = np.zeros(n, dtype=np.int64)
            splits, n_frames = [], np.zeros(n, dtype=np.int64)
            sizes, mtimes = np.full(n, UNKNOWN, dtype=np.int64), np.full(n, UNKNOWN, dtype=np.int64)
            mask_all = np.zeros((n, t), dtype=bool)
            for i, key in enumerate(keys):
                row = read_row(key)
                feats[i] = row.features
                mask_all[i] = row.mask
                labels[i] = row.label
                splits.append(row.split)
                n_frames[i] = row.n_frames
                sizes[i], mtimes[i] = row.size, row.mtime_ns
            _write_mask(out, mask_all)
            _write_columns(out, keys, labels, splits, n_frames, sizes, mtimes, failed, failed_identity, stale)
    return tmp


_SLAB_BYTES = 16 << 20  # features copied at once when a one-file cache is written anew


def _write_one_file_temporary(
    path: Path,
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
) -> Path:
    """``_write_temporary``'s file from whole columns: row ``i``'s features are row ``at[i]`` of the open cache
    ``old`` (copied in slabs of consecutive rows) or, where ``at[i]`` < 0, ``fresh[i]``. A slab that fails to
    read is read again row by row, so a damaged row is named as ``_RowReader`` names it."""
    c = config
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    n, t = len(keys), c.frames
    feat_bytes = max(1, int(np.prod((t, *c.feature_shape))) * np.dtype(c.dtype).itemsize)
    slab = max(1, _SLAB_BYTES // feat_bytes)  # rows per copy: memory stays bounded whatever the cache size
    with _whole_or_nothing(tmp):
        # built in memory (at most the one-file limit): a full disk is then an OSError after HDF5 closed the file
        with _h5_create(tmp, in_memory=True) as out:
            for k, v in c.attrs().items():
                out.attrs[k] = v
            feats = out.create_dataset(
                "features",
                shape=(n, t, *c.feature_shape),
                dtype=c.dtype,
                chunks=(1, t, *c.feature_shape) if n else None,
                fletcher32=True,
            )
            copied = np.flatnonzero(at >= 0)
            if len(copied):
                source = old["features"]
                # runs of rows consecutive both here and in the old cache, cut into slabs
                cuts = np.flatnonzero((np.diff(copied) != 1) | (np.diff(at[copied]) != 1)) + 1
                for run in np.split(copied, cuts):
                    for a in range(0, len(run), slab):
                        piece = run[a : a + slab]
                        first, last = int(at[piece[0]]), int(at[piece[-1]]) + 1
                        feats[int(piece[0]) : int(piece[-1]) + 1] = _read_slab(old, source, first, last)
            for i, features in fresh.items():
                feats[i] = features
            _write_mask(out, np.asarray(mask, dtype=bool).reshape(n, t))
            _write_columns(out, keys, labels, splits, n_frames, sizes, mtimes, failed, failed_identity, stale)
    return tmp


def _read_slab(f, source, first: int, last: int) -> np.ndarray:
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


# ----------------------------------------------------------------------------- part files


def parts_dir(cache: str | Path) -> Path:
    """The folder of a cache's part files: ``<cache>.parts`` beside it."""
    cache = Path(cache)
    return cache.with_name(cache.name + ".parts")


# Features per part file written by extract: each part is built in memory and written by Python, so a full
# disk is a plain OSError (HDF5 itself meeting ENOSPC cannot close the file, and its handles crash the process).
_PART_BYTES = 64 << 20


def _row_bytes(config: CacheConfig) -> int:
    return max(1, int(np.prod((config.frames, *config.feature_shape))) * np.dtype(config.dtype).itemsize)


def _one_file_limit() -> int:
    """Bytes of features up to which a cache is written as one file (``FEATPIPE_ONE_FILE_MB``, default 64)."""
    raw = os.environ.get("FEATPIPE_ONE_FILE_MB", "").strip()
    try:
        mb = float(raw) if raw else 64.0
    except ValueError:
        mb = 64.0
    return int(max(mb, 0.0) * (1 << 20)) if np.isfinite(mb) else 1 << 62


@dataclass
class _Columns:
    """The small per-row columns of a cache being written (everything but the features)."""

    keys: list
    mask: np.ndarray  # (N, T) bool
    label: np.ndarray
    split: list
    n_frames: np.ndarray
    size: np.ndarray
    mtime_ns: np.ndarray

    @classmethod
    def read(cls, f, rows: np.ndarray, keys: list | None = None, splits: list | None = None) -> "_Columns":
        """Rows ``rows`` (in that order) of an open cache; ``keys`` / ``splits``, when the caller knows them
        (its keys of those rows, the splits they get), are taken instead of read."""
        n = int(f["label"].shape[0])
        if "size" in f and "mtime_ns" in f:
            size, mtime = f["size"][:], f["mtime_ns"][:]
        else:
            size = mtime = np.full(n, UNKNOWN, dtype=np.int64)
        mask = f["mask"][()]
        check_masks(f, f.filename, mask)
        return cls(
            list(keys) if keys is not None else list(f["video"].asstr()[:][rows]),
            mask[rows].astype(bool),
            f["label"][:][rows],
            list(splits) if splits is not None else list(f["split"].asstr()[:][rows]),
            f["n_frames"][:][rows],
            size[rows],
            mtime[rows],
        )

    @classmethod
    def concat(cls, parts: list["_Columns"], t: int) -> "_Columns":
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
        )


@dataclass
class _Sources:
    """Where a cache's features are: files (paths), their row counts, and per row the file index and row."""

    files: list
    rows: list
    index: np.ndarray
    row: np.ndarray


def _sources_of(f, path: Path) -> _Sources:
    """The files holding an open cache's features: its part files, or the file itself when it is one file."""
    if "parts" in f:
        g = f["parts"]
        return _Sources(
            [path.parent / n for n in g["file"].asstr()[:]],
            [int(r) for r in g["rows"][:]],
            g["index"][:].astype(np.int64),
            g["row"][:].astype(np.int64),
        )
    n = int(f["features"].shape[0])
    return _Sources([path], [n], np.zeros(n, dtype=np.int64), np.arange(n, dtype=np.int64))


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
        with _whole_or_nothing(target):
            shutil.copyfile(src, target)
    return f"{parts.name}/{target.name}"


def _write_part(parts: Path, config: CacheConfig, n: int, features: Iterator[np.ndarray]) -> Path:
    """Write ``n`` clips' features into a new, immutable part file in ``parts``, fsync it and return its path."""
    c = config
    parts.mkdir(parents=True, exist_ok=True)
    path = parts / f"{uuid.uuid4().hex}.h5"
    with _whole_or_nothing(path):
        with _h5_create(path, in_memory=True) as f:  # at most _PART_BYTES of features
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


def _write_parted_temporary(
    path: Path,
    config: CacheConfig,
    cols: _Columns,
    src: _Sources,
    failed: dict[str, str],
    failed_identity: dict[str, Identity] | None,
    stale: dict[str, str] | None,
) -> Path:
    """Like ``_write_temporary``, but ``features`` is a virtual dataset over the files of ``src``.

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
    _fsync_dir(parts)
    n, tail = len(index), (c.frames, *c.feature_shape)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with _whole_or_nothing(tmp):
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
            grp = out.create_group("parts")
            grp.create_dataset("file", data=np.array(names, dtype=object), dtype=h5py.string_dtype())
            grp.create_dataset("rows", data=np.array(counts, dtype=np.int64))
            grp.create_dataset("index", data=index.astype(np.int64))
            grp.create_dataset("row", data=row.astype(np.int64))
    return tmp


def has_checksums(f, path: Path, skip: Sequence[int] = ()) -> bool:
    """True when every row of the open cache ``f`` (at ``path``) is stored with a fletcher32 checksum.

    A virtual ``features`` dataset reports no filters of its own: its part files are asked
    (an old one-file cache serving as a part may have none). Reading a row through the virtual
    dataset checks that row's checksum in its part file.
    """
    if "parts" not in f:
        return bool(f["features"].fletcher32)
    for i, name in enumerate(f["parts/file"].asstr()[:]):
        if i in skip:  # unreadable: reported on its own
            continue
        with h5py.File(Path(path).parent / name, "r") as part:
            if not part["features"].fletcher32:
                return False
    return True


def _collect_parts(path: Path) -> None:
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
            with _no_readers(path) as alone:
                if not alone:
                    return  # a reader may still read them through the cache file it opened: they go later
                for p in unused:
                    p.unlink()
        if not any(parts.iterdir()):
            parts.rmdir()
    except OSError:
        pass  # a read-only or vanished folder: the orphans cost only space and go next time


def _install(tmp: Path, path: Path) -> None:
    """Atomically replace ``path`` with the finished temporary file ``tmp``."""
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def iter_journal(path: Path) -> Iterator[dict]:
    """Headers of the valid records of a journal (for inspection and tests)."""
    _, entries, _ = _read_journal(Path(path))
    for e in entries:
        yield e.header


# ----------------------------------------------------------------------------- merging shards


@dataclass
class _Shard:
    path: Path
    file: object  # the open h5py.File
    config: CacheConfig
    index: int
    count: int


def find_shards(output: str | Path) -> list[Path]:
    """The shard files of the cache ``output`` beside it (``<stem>.shard-I-of-N<suffix>``), by N then I."""
    output = Path(output)
    if not output.parent.is_dir():
        return []
    found = []
    for p in output.parent.iterdir():
        parsed = parse_shard_path(p)
        if parsed is not None and parsed[0].name == output.name and p.is_file():
            found.append((parsed[2], parsed[1], p))
    return [p for _, _, p in sorted(found)]


def merge_shards(
    shards: str | Path | Sequence[str | Path] | None = None,
    output: str | Path | None = None,
    force: bool = False,
    compact: bool = False,
) -> Path:
    """Combine the shards of one ``extract --shard I/N`` set into the cache ``output``; return its path.

    Without ``shards``, every ``<output stem>.shard-*-of-*<suffix>`` beside ``output`` is taken.
    The result holds the rows an unsharded extraction writes (the informational ``shard``
    attribute dropped). Small results (see ``FEATPIPE_ONE_FILE_MB``) and ``compact=True`` are
    written as one file, rows sorted by clip key, one clip in memory at a time; larger ones
    hard-link the shards' part files (or whole files) into ``<output>.parts/`` and write only
    the small columns, rows grouped by shard. Either way through a temporary file, fsynced and
    renamed. Raises CacheError, naming the file, for a missing, unfinished or locked shard,
    shards of different N or settings, one clip with different contents in two shards, and an
    existing ``output`` (unless ``force``). ``compact=True`` with one whole (unsharded) cache
    writes a one-file copy of it (see ``compact``).
    """
    if output is None:
        raise FeatpipeError("Name the merged cache with --output FILE, e.g. --output cache/inceptionv3.h5.")
    check_file_option("output", output)
    output = Path(output)
    shards = None if shards is None else as_paths("shards", shards, "a shard file")  # merge("x.h5"): one file
    if compact and shards and len(_unique_paths(shards)) == 1 and _is_whole_cache(_unique_paths(shards)[0]):
        return compact_cache(_unique_paths(shards)[0], output, force=force)
    paths = _unique_paths(shards) if shards else find_shards(output)
    if not paths:
        raise CacheError(
            f"No shards of '{output}' found (files named {output.stem}.shard-I-of-N{output.suffix} beside it); "
            f"run `featpipe extract --shard I/N --output {output}` for every I first, or name the shard files."
        )
    if any(p.resolve() == output.resolve() for p in paths):
        raise CacheError(f"'{output}' is one of the shards; write the merged cache to another file with --output.")
    if output.exists() and not force:
        raise CacheError(f"'{output}' already exists; pass --force to replace it with the merged shards.")
    for p in paths:
        if not p.is_file():
            if journal_path(p).exists():
                _refuse_in_progress(p)
            raise CacheError(f"Shard file '{p}' does not exist.")
    with ExitStack() as locks:
        _lock(
            locks,
            output,
            f"Another featpipe command is writing '{output}' right now; wait for it to finish, "
            f"or merge into another file with --output.",
        )
        for p in paths:
            _lock(locks, p, _running(p), read_only_ok=True)
            if journal_path(p).exists():
                raise CacheError(_unfinished(p))
        try:
            with ExitStack() as files:
                ordered = _check_set([_open_shard(files, p) for p in paths], output if not shards else None)
                _collect_parts(output)  # we hold the output's lock: parts of a killed merge
                tmp = _merge_into_temporary(ordered, output, compact)
            try:
                _install(tmp, output)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            _collect_parts(output)  # parts of the replaced output
        except OSError as exc:
            raise write_error(exc, output, "the shards are unchanged") from None
    return output


def _unique_paths(paths: Sequence[str | Path]) -> list[Path]:
    out, seen = [], set()
    for p in map(Path, paths):
        if p.resolve() not in seen:
            seen.add(p.resolve())
            out.append(p)
    return out


def _refuse_in_progress(path: Path) -> None:
    """For a shard with only a journal: say whether its extraction is running (locked) or was stopped."""
    with ExitStack() as lock:
        _lock(lock, path, _running(path), read_only_ok=True)
    raise CacheError(_unfinished(path))


def _running(path: Path) -> str:
    return f"Shard '{path}' is being written by a running extraction; wait for it to finish, then merge."


def _unfinished(path: Path) -> str:
    parsed = parse_shard_path(path)
    which = f"--shard {parsed[1]}/{parsed[2]}" if parsed else "--shard I/N"
    return (
        f"Shard '{path}' has an unfinished extraction ('{journal_path(path).name}' is beside it); re-run that "
        f"shard's `featpipe extract {which}` with the same options to finish it, then merge."
    )


def _lock(stack: ExitStack, path: Path, message: str, read_only_ok: bool = False) -> None:
    """Lock ``path``; ``read_only_ok``: a file on read-only media (no lock file possible) cannot be being written."""
    try:
        stack.enter_context(CacheLock(path))
    except CannotWrite:
        if not read_only_ok:
            raise
    except CacheError:
        raise CacheError(message) from None


def _open_shard(stack: ExitStack, path: Path) -> _Shard:
    f = stack.enter_context(open_h5(path))
    config = CacheConfig.from_attrs(dict(f.attrs))
    spec = config.extra.get("shard")
    if spec is None:
        raise CacheError(
            f"'{path}' is a whole cache, not a shard (it has no shard attribute); merge only files "
            f"written by `featpipe extract --shard I/N`."
        )
    try:
        index, count = parse_shard(_as_str(spec))
    except FeatpipeError:
        raise CacheError(
            f"'{path}' has a damaged shard attribute ({_as_str(spec)!r}); re-extract that shard."
        ) from None
    return _Shard(path, f, config, index, count)


def _check_set(opened: list[_Shard], base: Path | None) -> list[_Shard]:
    """Shards 1..N of one set, all made with the same settings; ``base`` names the missing files."""
    counts = sorted({s.count for s in opened})
    if len(counts) > 1:
        a, b = (next(s for s in opened if s.count == n) for n in counts[:2])
        raise CacheError(
            f"The shards belong to different sets: '{a.path}' is shard {a.index}/{a.count} but "
            f"'{b.path}' is shard {b.index}/{b.count}; merge the files of one --shard I/N set (move the others away)."
        )
    n = counts[0]
    by_index: dict[int, _Shard] = {}
    for s in opened:
        if s.index in by_index:
            raise CacheError(
                f"'{by_index[s.index].path}' and '{s.path}' are both shard {s.index}/{n}; merge only one of them."
            )
        by_index[s.index] = s
    missing = [i for i in range(1, n + 1) if i not in by_index]
    if missing:
        if base is None:
            parsed = parse_shard_path(opened[0].path)
            base = parsed[0] if parsed else opened[0].path
        i, expected = missing[0], shard_path(base, missing[0], n)
        also = f" (also missing: {', '.join(f'{j}/{n}' for j in missing[1:])})" if len(missing) > 1 else ""
        if expected.is_file():
            raise CacheError(f"Shard {i}/{n} is missing from the shards given{also}: add '{expected}'.")
        if journal_path(expected).exists():  # its first run is still going, or was killed before writing the file
            _refuse_in_progress(expected)
        raise CacheError(
            f"Shard {i}/{n} is missing{also}: '{expected}' does not exist; run `featpipe extract --shard {i}/{n}` "
            f"with the same options as the other shards, then merge."
        )
    ordered = [by_index[i] for i in range(1, n + 1)]
    first = ordered[0]
    for s in ordered[1:]:
        diffs = first.config.differences(
            s.config, WRITE_KEYS, mine_label=f"in shard {first.index}/{n}", theirs_label=f"in shard {s.index}/{n}"
        )
        if diffs:
            raise CacheError(
                f"Refusing to merge '{first.path}' and '{s.path}': they were extracted with different settings "
                f"({'; '.join(diffs)}). Re-extract the odd shard with the same options as the others."
            )
    return ordered


def _is_whole_cache(path: Path) -> bool:
    """True for a readable cache file that is not a shard."""
    if not Path(path).is_file():
        return False
    with open_h5(Path(path)) as f:
        return "shard" not in f.attrs


def compact_cache(path: str | Path, output: str | Path | None = None, force: bool = False) -> Path:
    """Write the cache ``path`` as one self-contained file (no part files), rows sorted by clip key.

    ``output`` defaults to ``path`` itself (rewritten in place, atomically, under its lock; its
    part files are then removed). Costs one copy of the features: use it before copying a cache
    to another machine, or when it has collected many part files. Returns the written path.
    """
    path = Path(path)
    output = Path(output) if output is not None else path
    check_file_option("output", output)
    in_place = output.exists() and path.exists() and output.resolve() == path.resolve()
    if output.exists() and not in_place and not force:
        raise CacheError(f"'{output}' already exists; pass --force to replace it with the compacted cache.")
    with ExitStack() as locks:
        _lock(
            locks,
            output,
            f"Another featpipe command is writing '{output}' right now; wait for it to finish, "
            f"or write to another file with --output.",
        )
        if not in_place:
            _lock(
                locks,
                path,
                f"An extraction is writing '{path}' right now; wait for it to finish, then compact.",
                read_only_ok=True,
            )
        if journal_path(path).exists():
            raise CacheError(
                f"'{path}' has an unfinished extraction ('{journal_path(path).name}' is beside it); "
                f"run the same `featpipe extract` again to finish it, then compact."
            )
        try:
            with open_h5(path) as f:
                config = CacheConfig.from_attrs(dict(f.attrs))
                keys = list(f["video"].asstr()[:])
                at = {k: i for i, k in enumerate(keys)}
                failed_keys = _strings(f, "failed/video")
                failed = dict(zip(failed_keys, _strings(f, "failed/reason")))
                f_ident = _identities(f["failed"], len(failed_keys)) if "failed" in f else []
                stale = dict(zip(_strings(f, "stale/video"), _strings(f, "stale/reason")))
                _remove_stale_temporaries(output)
                read = _RowReader(f)
                tmp = _write_temporary(
                    output,
                    config,
                    sorted(keys),
                    lambda k: read(at[k]),
                    failed,
                    failed_identity={k: i for k, i in zip(failed_keys, f_ident) if i},
                    stale=stale,
                )
            try:
                _install(tmp, output)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise write_error(exc, output, f"'{path}' is unchanged") from None
        _collect_parts(output)
    return output


def _merge_into_temporary(ordered: list[_Shard], output: Path, compact: bool = False) -> Path:
    rows: dict[str, tuple[_Shard, int]] = {}  # clip key -> (shard, row)
    failed: dict[str, str] = {}
    failed_identity: dict[str, Identity] = {}
    stale: dict[str, str] = {}
    for s in ordered:
        for row, key in enumerate(s.file["video"].asstr()[:]):
            if key in rows:
                other, other_row = rows[key]
                if not _same_row(_read_h5_row(other.file, other_row), _read_h5_row(s.file, row)):
                    raise CacheError(
                        f"Clip '{key}' is in both '{other.path}' and '{s.path}' with different contents; the shards "
                        f"were not extracted from the same data. Re-extract one of them."
                    )
                continue
            rows[key] = (s, row)
        failed_keys = _strings(s.file, "failed/video")
        identities = _identities(s.file["failed"], len(failed_keys)) if "failed" in s.file else []
        for key, reason, ident in zip(failed_keys, _strings(s.file, "failed/reason"), identities):
            failed.setdefault(key, reason)
            if ident is not None:
                failed_identity.setdefault(key, ident)
        for key, reason in zip(_strings(s.file, "stale/video"), _strings(s.file, "stale/reason")):
            stale.setdefault(key, reason)
    failed = {k: v for k, v in failed.items() if k not in rows}
    stale = {k: v for k, v in stale.items() if k not in rows}
    first = ordered[0].config
    config = dataclasses.replace(first, extra={k: v for k, v in first.extra.items() if k != "shard"})
    _remove_stale_temporaries(output)  # we hold the output's lock: these are from killed runs
    feat_bytes = int(np.prod((config.frames, *config.feature_shape))) * np.dtype(config.dtype).itemsize
    if compact or len(rows) * feat_bytes <= _one_file_limit():
        readers = {id(s): _RowReader(s.file) for s in ordered}
        return _write_temporary(
            output,
            config,
            sorted(rows),
            lambda key: readers[id(rows[key][0])](rows[key][1]),
            failed,
            failed_identity=failed_identity,
            stale=stale,
        )
    # O(shards) in features: link each shard's files, write only the small columns (rows grouped by shard)
    pieces: list[_Columns] = []
    files, counts, index, row = [], [], [], []
    for s in ordered:
        videos = s.file["video"].asstr()[:]
        take = np.array([rows[k][0] is s and rows[k][1] == i for i, k in enumerate(videos)], dtype=bool)
        at = np.flatnonzero(take)
        src = _sources_of(s.file, s.path)
        index.append(src.index[at] + len(files))
        row.append(src.row[at])
        files += src.files
        counts += src.rows
        pieces.append(_Columns.read(s.file, at))
    src = _Sources(files, counts, np.concatenate(index), np.concatenate(row))
    return _write_parted_temporary(
        output, config, _Columns.concat(pieces, config.frames), src, failed, failed_identity, stale
    )


def _same_row(a: _Row, b: _Row) -> bool:
    return (
        np.array_equal(a.features, b.features)
        and np.array_equal(a.mask, b.mask)
        and (a.label, a.split, a.n_frames) == (b.label, b.split, b.n_frames)
    )


# ----------------------------------------------------------------------------- checksums
# Features are stored with HDF5's fletcher32 filter (one checksum per row, see _write_temporary).
# HDF5 refuses to read a chunk whose checksum does not match ("filter returned failure during
# read", an OSError); these helpers turn that into a sentence naming the damaged clips. Caches
# written before checksums (no filter) read as before; `verify_cache` says they carry none.

_VERIFY_ROWS = 64  # rows per read while verifying; a failing block is re-read row by row


class DamagedCacheError(CacheError):
    """Rows of a cache fail their checksum: the file was damaged after it was written."""

    exit_code = 1


def _clips(videos: Sequence[str]) -> str:
    shown = ", ".join(f"'{v}'" for v in videos[:5]) + (f" and {len(videos) - 5} more" if len(videos) > 5 else "")
    return ("clip " if len(videos) == 1 else f"{len(videos)} clips ") + shown


def damaged_message(path, videos: Sequence[str], what: str = "features") -> str:
    """One sentence naming the damaged clips of ``path`` and what to do; ``what``: "features" or "frame mask"."""
    fails = (
        "fail their checksum"
        if what == "features"
        else "fail their checksum or are not a valid mask (real frames first)"
    )
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


# The mask is checksummed per row (``mask_crc32``: zlib.crc32 of the row's bytes, 0 or 1 each),
# and a real mask is always a prefix (True for the real frames, then False): caches written before
# the checksum (no ``mask_crc32``) are checked by that rule alone.
MASK_CRC = "mask_crc32"


def mask_crc32(mask: np.ndarray) -> np.ndarray:
    """Per row of an (N, T) bool mask, zlib.crc32 of its T bytes as stored."""
    raw = np.ascontiguousarray(mask).view(np.uint8)
    return np.fromiter((zlib.crc32(r) for r in raw), dtype=np.uint32, count=len(raw))


def _write_mask(out, mask: np.ndarray) -> None:
    """The ``mask`` dataset of a cache being written, and its per-row checksums."""
    mask = np.asarray(mask)
    mask = (mask.view(np.uint8) if mask.dtype == bool else mask) != 0
    out.create_dataset("mask", data=mask)
    out.create_dataset(MASK_CRC, data=mask_crc32(mask))


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


def _part_clips(f, part: int) -> list[str]:
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
        raise DamagedCacheError(part_message(path, name, problems[hit[0]], _part_clips(f, hit[0])))


def _rows_of(sel, n: int) -> list[int]:
    if isinstance(sel, slice):
        return list(range(*sel.indices(n)))
    return [int(r) for r in np.atleast_1d(np.asarray(sel)).ravel()]


def _row_reads(ds, row: int) -> bool:
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
        bad = [r for r in dict.fromkeys(_rows_of(sel, len(ds))) if not _row_reads(ds, r)]
        if not bad:
            raise CacheError(
                f"Reading the features of '{path}' failed ({exc}); check the disk, "
                "or re-extract into a new --output file."
            ) from exc
        videos = f["video"].asstr()
        raise DamagedCacheError(damaged_message(path, [videos[r] for r in bad])) from exc


@dataclass
class VerifyReport:
    """What :func:`verify_cache` found: every row read back, and which failed."""

    path: Path
    n_rows: int
    checksummed: bool  # False for caches written before features carried checksums
    damaged: list[str]  # clip keys whose features or mask are damaged, or whose part file cannot be read
    bad_features: list[str] = field(default_factory=list)  # ... whose features fail their checksum
    bad_masks: list[str] = field(default_factory=list)  # ... whose mask fails its checksum or the prefix rule
    bad_parts: list[tuple[str, str, list[str]]] = field(default_factory=list)  # (part file, why, its clips)
    mask_checksummed: bool = True  # False for caches written before masks carried checksums (prefix rule only)

    def line(self) -> str:
        if self.damaged:
            out = [part_message(self.path, name, why, clips) for name, why, clips in self.bad_parts]
            if self.bad_features:
                out.append(damaged_message(self.path, self.bad_features))
            if self.bad_masks:
                out.append(damaged_message(self.path, self.bad_masks, what="frame mask"))
            return " ".join(out)
        masks = (
            ""
            if self.mask_checksummed
            else " The masks carry no checksum (an older cache): they were checked to be real frames first only."
        )
        if not self.checksummed:
            return (
                f"all {self.n_rows} rows read, but this cache carries no checksum (written by an older "
                f"featpipe): damaged features cannot be detected; re-extract into a new file to add them.{masks}"
            )
        return f"all {self.n_rows} rows verified (fletcher32 checksums).{masks}"


def verify_cache(path) -> VerifyReport:
    """Read every row of a cache's features, checking each row's checksum, and check every mask.

    A part file that is truncated or cannot be read is reported with the clips it holds (a virtual
    dataset would read NaN for them, not fail).
    """
    path = Path(path)
    with open_h5(path) as f:
        if "features" not in f or "video" not in f:
            raise CacheError(f"'{path}' has no 'features' or 'video' dataset; it is not a complete featpipe cache.")
        ds = f["features"]
        videos = f["video"].asstr()[()]
        n = len(ds)
        problems = part_problems(f, path)
        bad_parts = [(f["parts/file"].asstr()[i], why, _part_clips(f, i)) for i, why in sorted(problems.items())]
        in_bad_parts = [v for _, _, clips in bad_parts for v in clips]
        skip = set(in_bad_parts)
        bad_features: list[str] = []
        for start in range(0, n, _VERIFY_ROWS):
            stop = min(start + _VERIFY_ROWS, n)
            try:
                ds[start:stop]
            except OSError:
                bad_features += [
                    str(videos[r]) for r in range(start, stop) if str(videos[r]) not in skip and not _row_reads(ds, r)
                ]
        mask = f["mask"][()] if "mask" in f else np.zeros((n, 0), dtype=bool)
        bad_masks = [str(videos[r]) for r in mask_damage(mask, f[MASK_CRC][()] if MASK_CRC in f else None)]
        damaged = list(dict.fromkeys([*in_bad_parts, *bad_features, *bad_masks]))
        return VerifyReport(
            path,
            n,
            has_checksums(f, path, skip=problems),
            damaged,
            bad_features,
            bad_masks,
            bad_parts,
            MASK_CRC in f,
        )


def missing_parts(path) -> list[str]:
    """The datasets every finished cache has that ``path`` lacks (empty for a complete cache)."""
    with open_h5(Path(path)) as f:
        return [
            name
            for name in ("features", "mask", "label", "split", "video", "n_frames", "failed/video", "failed/reason")
            if name not in f
        ]
