"""The HDF5 feature cache: schema, a crash-safe resumable writer, and a validating reader.

Schema (version 1), readable with plain h5py and pandas:

  features        (N, T, *feature_shape)  float16 (default) or float32; one clip per chunk
  mask            (N, T)  bool            True exactly for real (not padded) frames
  label           (N,)    int             index into attrs["class_names"]
  split           (N,)    str             train / val / test
  video           (N,)    str             clip path relative to the data root (the clip's key)
  n_frames        (N,)    int             frames in the whole clip
  failed/video    (F,)    str             clips that could not be used ...
  failed/reason   (F,)    str             ... and why
  attrs: schema_version, backbone, weights, weights_fingerprint, input_size, frames, sampling,
         class_names, dtype, feature_shape, featpipe_version, keras_version, keras_backend,
         data_root, layout

Crash safety. The HDF5 file is never modified in place. While extracting, every finished clip
is appended to a journal beside the cache (``<cache>.journal``) as one checksummed record; a
record torn by a kill fails its checksum and is dropped on the next open. At the end the cache
is rewritten into a temporary file (old rows + journal rows, in key order) that atomically
replaces the old cache, and only then is the journal removed. So a SIGKILL at any moment loses
at most the clips in flight, and the next run resumes from cache + journal and ends with the
same cache a clean run produces. An exclusive lock (``<cache>.lock``, released by the OS when
the process dies) stops two extractions from writing one cache at once.

Shards. ``extract --shard I/N`` writes the clips whose key hashes to I (of N) into
``<stem>.shard-I-of-N<suffix>`` beside the cache, with its own journal and lock; every shard
records the full dataset's class names. ``merge_shards`` checks that a set is complete,
finished and made with one set of settings, and writes the cache an unsharded run would have
written (rows sorted by clip key), atomically, copying one clip at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import struct
import zlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from featpipe.errors import CacheError, FeatpipeError

SCHEMA_VERSION = 1

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
    weights_fingerprint: str
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
            raise CacheError(f"The cache is missing the attribute(s) {', '.join(missing)}; it was not written by featpipe.")
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

    def differences(self, other: "CacheConfig", keys=WRITE_KEYS, mine_label: str = "requested",
                    theirs_label: str = "in the cache") -> list[str]:
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

    @property
    def ok(self) -> bool:
        return self.error is None


# ----------------------------------------------------------------------------- journal


def journal_path(cache: Path) -> Path:
    return cache.with_name(cache.name + ".journal")


def lock_path(cache: Path) -> Path:
    return cache.with_name(cache.name + ".lock")


def _encode_record(rec: ClipRecord, config: CacheConfig) -> bytes:
    header = {"video": rec.video, "label": int(rec.label), "split": rec.split, "n_frames": int(rec.n_frames)}
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


class CacheLock:
    """Exclusive, non-blocking lock on ``<cache>.lock``; the OS releases it if the process dies."""

    def __init__(self, cache: Path):
        self.path = lock_path(cache)
        self._fh = None

    def __enter__(self) -> "CacheLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a+")
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


def _require_h5py():
    import h5py

    return h5py


def read_config(path: Path) -> CacheConfig:
    """Open a finished cache just long enough to validate and return its config."""
    with open_h5(path) as f:
        return CacheConfig.from_attrs(dict(f.attrs))


def open_h5(path: Path):
    """Open a cache read-only, turning every way it can be wrong into one CacheError sentence."""
    h5py = _require_h5py()
    path = Path(path)
    if not path.exists():
        raise CacheError(f"Cache file '{path}' does not exist; run `featpipe extract` first or pass --cache FILE.")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CacheError(f"'{path}' is not a readable HDF5 file ({exc}); it may be truncated. Re-run `featpipe extract`.") from exc
    version = f.attrs.get("schema_version")
    if version is None:
        f.close()
        raise CacheError(f"'{path}' is an HDF5 file but not a featpipe cache (no schema_version attribute).")
    if int(version) != SCHEMA_VERSION:
        f.close()
        raise CacheError(
            f"'{path}' uses cache schema version {int(version)}, this featpipe reads version {SCHEMA_VERSION}; "
            f"re-extract it with this version of featpipe."
        )
    return f


@dataclass
class CacheSummary:
    path: Path
    config: CacheConfig
    n_clips: int
    n_failed: int
    counts: dict[str, dict[str, int]]  # split -> class -> clips
    failed: list[tuple[str, str]]
    real_frames: int

    def lines(self) -> list[str]:
        c = self.config
        shard = f" (shard {_as_str(c.extra['shard'])}; combine the shards with `featpipe merge`)" if "shard" in c.extra else ""
        out = [
            f"Cache {self.path}{shard}: {self.n_clips} clips, {self.real_frames} real frames, {self.n_failed} failed",
            f"  backbone {c.backbone} ({c.weights}, fingerprint {c.weights_fingerprint}), input {c.input_size}px, "
            f"{c.frames} frames ({c.sampling}), features {list(c.feature_shape)} {c.dtype}",
        ]
        width = max(len(n) for n in c.class_names)
        splits = [s for s in ("train", "val", "test") if s in self.counts] + sorted(
            s for s in self.counts if s not in ("train", "val", "test"))
        out.append("  " + "class".ljust(width) + "".join(s.rjust(8) for s in splits))
        for name in c.class_names:
            out.append("  " + name.ljust(width) + "".join(str(self.counts[s].get(name, 0)).rjust(8) for s in splits))
        for video, reason in self.failed:
            out.append(f"  failed: {video}: {reason}")
        return out


def summarize(path: Path) -> CacheSummary:
    with open_h5(path) as f:
        config = CacheConfig.from_attrs(dict(f.attrs))
        labels = f["label"][:]
        splits = f["split"].asstr()[:]
        counts: dict[str, dict[str, int]] = {}
        for lab, sp in zip(labels, splits):
            counts.setdefault(str(sp), {}).setdefault(config.class_names[int(lab)], 0)
            counts[str(sp)][config.class_names[int(lab)]] += 1
        failed = list(zip(f["failed/video"].asstr()[:], f["failed/reason"].asstr()[:]))
        return CacheSummary(path, config, len(labels), len(failed), counts, failed, int(f["mask"][:].sum()))


# ----------------------------------------------------------------------------- writing


class CacheWriter:
    """Resumable writer for one cache file. Use under ``CacheLock``.

    ``done`` lists the clip keys already extracted (cache + journal); ``failed`` those recorded
    as unusable. ``append`` journals a clip; ``finalize`` folds everything into the HDF5 file.
    """

    def __init__(self, path: Path, config: CacheConfig):
        self.path = Path(path)
        self.config = config
        self.journal = journal_path(self.path)
        _remove_stale_temporaries(self.path)  # a finalize killed before its rename; the old cache is intact
        self._existing: dict[str, int] = {}  # key -> row in the existing cache
        self._existing_failed: dict[str, str] = {}
        if self.path.exists():
            with open_h5(self.path) as f:
                theirs = CacheConfig.from_attrs(dict(f.attrs))
                self._check(theirs, f"the existing cache '{self.path}'")
                self._existing = {v: i for i, v in enumerate(f["video"].asstr()[:])}
                self._existing_failed = dict(zip(f["failed/video"].asstr()[:], f["failed/reason"].asstr()[:]))
        self._journal_entries: dict[str, _JournalEntry] = {}
        if self.journal.exists():
            attrs, entries, end = _read_journal(self.journal)
            if attrs is None:
                self.journal.unlink()  # killed while creating the journal: nothing in it
            else:
                self._check(CacheConfig.from_attrs(attrs), f"the unfinished extraction '{self.journal}'")
                with open(self.journal, "r+b") as fh:
                    fh.truncate(end)  # drop a torn tail record
                for entry in entries:
                    self._journal_entries[entry.header["video"]] = entry  # a later record wins
        self._writer: JournalWriter | None = None

    def _check(self, theirs: CacheConfig, what: str) -> None:
        diffs = self.config.differences(theirs)
        if diffs:
            raise CacheError(
                f"Refusing to add clips to {what}: it was made with different settings ({'; '.join(diffs)}). "
                f"Use the same settings, or write a new cache with --output FILE."
            )

    @property
    def done(self) -> set[str]:
        ok_existing = set(self._existing)
        ok_journal = {k for k, e in self._journal_entries.items() if "error" not in e.header}
        return ok_existing | ok_journal

    @property
    def failed(self) -> dict[str, str]:
        out = {k: v for k, v in self._existing_failed.items() if k not in self._journal_entries}
        out.update({k: e.header["error"] for k, e in self._journal_entries.items() if "error" in e.header})
        return {k: v for k, v in out.items() if k not in self.done}

    @property
    def pending(self) -> bool:
        """True when the journal holds clips not yet folded into the HDF5 file."""
        return bool(self._journal_entries)

    def append(self, rec: ClipRecord) -> None:
        if self._writer is None:
            self._writer = JournalWriter(self.journal, self.config)
        self._writer.append(rec)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def finalize(self, assignments: dict[str, tuple[int, str]] | None = None) -> Path:
        """Write cache + journal into a new HDF5 file, atomically replace the cache, drop the journal.

        ``assignments`` maps clip key -> (label, split) from the current dataset index, so that
        re-splitting never needs re-extraction; clips not in it keep what they had.
        """
        self.close()
        if self.journal.exists():  # re-read: includes what this process appended
            _, entries, _ = _read_journal(self.journal)
            self._journal_entries = {}
            for e in entries:
                self._journal_entries[e.header["video"]] = e
        assignments = assignments or {}
        c = self.config
        rows: dict[str, tuple[str, object]] = {}  # key -> (source, handle)
        for key, row in self._existing.items():
            rows[key] = ("h5", row)
        failed = dict(self._existing_failed)
        for key, entry in self._journal_entries.items():
            if "error" in entry.header:
                if key not in rows:
                    failed[key] = entry.header["error"]
            else:
                rows[key] = ("journal", entry)
                failed.pop(key, None)
        keys = sorted(rows)
        failed = {k: v for k, v in failed.items() if k not in rows}
        failed_keys = sorted(failed)
        feat_bytes = int(np.prod((c.frames, *c.feature_shape))) * np.dtype(c.dtype).itemsize

        with ExitStack() as stack:
            old = stack.enter_context(open_h5(self.path)) if self._existing else None
            jf = stack.enter_context(open(self.journal, "rb")) if self.journal.exists() else None

            def read_row(key: str) -> _Row:
                source, handle = rows[key]
                if source == "h5":
                    row = _read_h5_row(old, handle)
                else:
                    jf.seek(handle.offset)
                    payload = jf.read(handle.length)
                    row = _Row(np.frombuffer(payload[:feat_bytes], dtype=c.dtype).reshape(c.frames, *c.feature_shape),
                               np.frombuffer(payload[feat_bytes:], dtype=bool), int(handle.header["label"]),
                               handle.header["split"], int(handle.header["n_frames"]))
                if key in assignments:
                    row = dataclasses.replace(row, label=int(assignments[key][0]), split=assignments[key][1])
                return row

            tmp = _write_temporary(self.path, c, keys, read_row, failed)
        _install(tmp, self.path)  # after the old cache is closed (Windows cannot replace an open file)
        if self.journal.exists():
            self.journal.unlink()
        self._existing = {k: i for i, k in enumerate(keys)}
        self._existing_failed = {k: failed[k] for k in failed_keys}
        self._journal_entries = {}
        return self.path


@dataclass(frozen=True)
class _Row:
    """One clip's row of a cache, as read from a cache, a journal or a shard."""

    features: np.ndarray  # (T, *feature_shape)
    mask: np.ndarray  # (T,) bool
    label: int
    split: str
    n_frames: int


def _read_h5_row(f, row: int) -> _Row:
    return _Row(f["features"][row], f["mask"][row], int(f["label"][row]), f["split"].asstr()[row], int(f["n_frames"][row]))


def _remove_stale_temporaries(path: Path) -> None:
    """Drop what a write killed before its rename left beside ``path`` (the old file is intact)."""
    for stale in path.parent.glob(path.name + ".tmp-*"):
        stale.unlink()


def _write_temporary(path: Path, config: CacheConfig, keys: list[str], read_row: Callable[[str], _Row],
                     failed: dict[str, str]) -> Path:
    """Write a complete cache into a temporary file beside ``path``, fsync it and return it.

    ``keys`` (sorted) become the rows, read one clip at a time with ``read_row``, so memory stays
    bounded whatever the cache size; ``failed`` maps clip key -> reason. ``_install`` then puts
    it in place. Used by ``CacheWriter.finalize`` and ``merge_shards``.
    """
    h5py = _require_h5py()
    c = config
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    n, t = len(keys), c.frames
    str_dt = h5py.string_dtype()
    failed_keys = sorted(failed)
    try:
        with h5py.File(tmp, "w") as out:
            for k, v in c.attrs().items():
                out.attrs[k] = v
            # fletcher32: a checksum per chunk (one row), checked by HDF5 on every read, transparent to
            # plain h5py readers; a damaged row then fails to read instead of reading as wrong numbers
            feats = out.create_dataset("features", shape=(n, t, *c.feature_shape), dtype=c.dtype,
                                       chunks=(1, t, *c.feature_shape) if n else None, fletcher32=True)
            masks = out.create_dataset("mask", shape=(n, t), dtype=bool)
            labels = np.zeros(n, dtype=np.int64)
            splits, n_frames = [], np.zeros(n, dtype=np.int64)
            mask_all = np.zeros((n, t), dtype=bool)
            for i, key in enumerate(keys):
                row = read_row(key)
                feats[i] = row.features
                mask_all[i] = row.mask
                labels[i] = row.label
                splits.append(row.split)
                n_frames[i] = row.n_frames
            masks[...] = mask_all
            out.create_dataset("label", data=labels)
            out.create_dataset("split", data=np.array(splits, dtype=object), dtype=str_dt)
            out.create_dataset("video", data=np.array(keys, dtype=object), dtype=str_dt)
            out.create_dataset("n_frames", data=n_frames)
            grp = out.create_group("failed")
            grp.create_dataset("video", data=np.array(failed_keys, dtype=object), dtype=str_dt)
            grp.create_dataset("reason", data=np.array([failed[k] for k in failed_keys], dtype=object), dtype=str_dt)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


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


def merge_shards(shards: Sequence[str | Path] | None = None, output: str | Path | None = None,
                 force: bool = False) -> Path:
    """Combine the shards of one ``extract --shard I/N`` set into the cache ``output``; return its path.

    Without ``shards``, every ``<output stem>.shard-*-of-*<suffix>`` beside ``output`` is taken.
    The result equals the cache an unsharded extraction writes (rows sorted by clip key; the
    informational ``shard`` attribute dropped); it is written to a temporary file, fsynced and
    renamed, one clip in memory at a time. Raises CacheError, naming the file, for a missing,
    unfinished or locked shard, shards of different N or settings, one clip with different
    contents in two shards, and an existing ``output`` (unless ``force``).
    """
    if output is None:
        raise FeatpipeError("Name the merged cache with --output FILE, e.g. --output cache/inceptionv3.h5.")
    output = Path(output)
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
        _lock(locks, output, f"Another featpipe command is writing '{output}' right now; wait for it to finish, "
                             f"or merge into another file with --output.")
        for p in paths:
            _lock(locks, p, _running(p))
            if journal_path(p).exists():
                raise CacheError(_unfinished(p))
        with ExitStack() as files:
            ordered = _check_set([_open_shard(files, p) for p in paths], output if not shards else None)
            tmp = _merge_into_temporary(ordered, output)
        _install(tmp, output)
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
        _lock(lock, path, _running(path))
    raise CacheError(_unfinished(path))


def _running(path: Path) -> str:
    return f"Shard '{path}' is being written by a running extraction; wait for it to finish, then merge."


def _unfinished(path: Path) -> str:
    parsed = parse_shard_path(path)
    which = f"--shard {parsed[1]}/{parsed[2]}" if parsed else "--shard I/N"
    return (f"Shard '{path}' has an unfinished extraction ('{journal_path(path).name}' is beside it); re-run that "
            f"shard's `featpipe extract {which}` with the same options to finish it, then merge.")


def _lock(stack: ExitStack, path: Path, message: str) -> None:
    try:
        stack.enter_context(CacheLock(path))
    except CacheError:
        raise CacheError(message) from None


def _open_shard(stack: ExitStack, path: Path) -> _Shard:
    f = stack.enter_context(open_h5(path))
    config = CacheConfig.from_attrs(dict(f.attrs))
    spec = config.extra.get("shard")
    if spec is None:
        raise CacheError(f"'{path}' is a whole cache, not a shard (it has no shard attribute); merge only files "
                         f"written by `featpipe extract --shard I/N`.")
    try:
        index, count = parse_shard(_as_str(spec))
    except FeatpipeError:
        raise CacheError(f"'{path}' has a damaged shard attribute ({_as_str(spec)!r}); re-extract that shard.") from None
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
            raise CacheError(f"'{by_index[s.index].path}' and '{s.path}' are both shard {s.index}/{n}; merge only one of them.")
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
        diffs = first.config.differences(s.config, WRITE_KEYS, mine_label=f"in shard {first.index}/{n}",
                                         theirs_label=f"in shard {s.index}/{n}")
        if diffs:
            raise CacheError(
                f"Refusing to merge '{first.path}' and '{s.path}': they were extracted with different settings "
                f"({'; '.join(diffs)}). Re-extract the odd shard with the same options as the others."
            )
    return ordered


def _merge_into_temporary(ordered: list[_Shard], output: Path) -> Path:
    rows: dict[str, tuple[_Shard, int]] = {}  # clip key -> (shard, row)
    failed: dict[str, str] = {}
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
        for key, reason in zip(s.file["failed/video"].asstr()[:], s.file["failed/reason"].asstr()[:]):
            failed.setdefault(key, reason)
    failed = {k: v for k, v in failed.items() if k not in rows}
    first = ordered[0].config
    config = dataclasses.replace(first, extra={k: v for k, v in first.extra.items() if k != "shard"})
    _remove_stale_temporaries(output)  # we hold the output's lock: these are from killed runs
    return _write_temporary(output, config, sorted(rows), lambda key: _read_h5_row(rows[key][0].file, rows[key][1]), failed)


def _same_row(a: _Row, b: _Row) -> bool:
    return (np.array_equal(a.features, b.features) and np.array_equal(a.mask, b.mask)
            and (a.label, a.split, a.n_frames) == (b.label, b.split, b.n_frames))


# ----------------------------------------------------------------------------- checksums
# Features are stored with HDF5's fletcher32 filter (one checksum per row, see _write_temporary).
# HDF5 refuses to read a chunk whose checksum does not match ("filter returned failure during
# read", an OSError); these helpers turn that into a sentence naming the damaged clips. Caches
# written before checksums (no filter) read as before; `verify_cache` says they carry none.

_VERIFY_ROWS = 64  # rows per read while verifying; a failing block is re-read row by row


class DamagedCacheError(CacheError):
    """Rows of a cache fail their checksum: the file was damaged after it was written."""

    exit_code = 1


def damaged_message(path, videos: Sequence[str]) -> str:
    """One sentence naming the damaged clips of ``path`` and what to do."""
    shown = ", ".join(f"'{v}'" for v in videos[:5]) + (f" and {len(videos) - 5} more" if len(videos) > 5 else "")
    clips = "clip" if len(videos) == 1 else f"{len(videos)} clips"
    return (f"The features of {clips} {shown} in '{path}' fail their checksum, so the cache file is damaged "
            f"(disk or copy error); re-extract: move '{path}' away and run `featpipe extract` again with the "
            f"same settings (`featpipe info --verify {path}` lists every damaged clip).")


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
            return out
        return ds[sel]
    except OSError as exc:
        bad = [r for r in dict.fromkeys(_rows_of(sel, len(ds))) if not _row_reads(ds, r)]
        if not bad:
            raise CacheError(f"Reading the features of '{path}' failed ({exc}); check the disk, "
                             "or re-extract into a new --output file.") from exc
        videos = f["video"].asstr()
        raise DamagedCacheError(damaged_message(path, [videos[r] for r in bad])) from exc


@dataclass
class VerifyReport:
    """What :func:`verify_cache` found: every row read back, and which failed."""

    path: Path
    n_rows: int
    checksummed: bool  # False for caches written before features carried checksums
    damaged: list[str]  # clip keys whose row failed to read

    def line(self) -> str:
        if self.damaged:
            return damaged_message(self.path, self.damaged)
        if not self.checksummed:
            return (f"all {self.n_rows} rows read, but this cache carries no checksum (written by an older "
                    "featpipe): damaged features cannot be detected; re-extract into a new file to add them.")
        return f"all {self.n_rows} rows verified (fletcher32 checksums)."


def verify_cache(path) -> VerifyReport:
    """Read every row of a cache's features, checking each row's checksum."""
    path = Path(path)
    with open_h5(path) as f:
        if "features" not in f or "video" not in f:
            raise CacheError(f"'{path}' has no 'features' or 'video' dataset; it is not a complete featpipe cache.")
        ds = f["features"]
        videos = f["video"].asstr()[()]
        n = len(ds)
        damaged: list[str] = []
        for start in range(0, n, _VERIFY_ROWS):
            stop = min(start + _VERIFY_ROWS, n)
            try:
                ds[start:stop]
            except OSError:
                damaged += [str(videos[r]) for r in range(start, stop) if not _row_reads(ds, r)]
        return VerifyReport(path, n, bool(ds.fletcher32), damaged)


def missing_parts(path) -> list[str]:
    """The datasets every finished cache has that ``path`` lacks (empty for a complete cache)."""
    with open_h5(Path(path)) as f:
        return [name for name in ("features", "mask", "label", "split", "video", "n_frames", "failed/video",
                                  "failed/reason") if name not in f]
