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
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from featpipe.errors import CacheError

SCHEMA_VERSION = 1

# Attributes that define what the features ARE: everything downstream must agree on them.
PREPROCESSING_KEYS = ("backbone", "weights", "weights_fingerprint", "input_size", "frames", "sampling")
# Attributes that must also match for new clips to be appended to an existing cache.
APPEND_KEYS = PREPROCESSING_KEYS + ("dtype", "feature_shape", "class_names")

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

    def differences(self, other: "CacheConfig", keys=APPEND_KEYS, mine_label: str = "requested",
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
        out = [
            f"Cache {self.path}: {self.n_clips} clips, {self.real_frames} real frames, {self.n_failed} failed",
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
        for stale in self.path.parent.glob(self.path.name + ".tmp-*"):
            stale.unlink()  # a finalize killed before its rename; the old cache is intact
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
        h5py = _require_h5py()
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
        failed_keys = sorted(k for k in failed if k not in rows)
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        old = open_h5(self.path) if self._existing else None
        n, t = len(keys), c.frames
        str_dt = h5py.string_dtype()
        try:
            with h5py.File(tmp, "w") as out, open(self.journal, "rb") if self.journal.exists() else _Null() as jf:
                for k, v in c.attrs().items():
                    out.attrs[k] = v
                feats = out.create_dataset("features", shape=(n, t, *c.feature_shape), dtype=c.dtype,
                                           chunks=(1, t, *c.feature_shape) if n else None)
                masks = out.create_dataset("mask", shape=(n, t), dtype=bool)
                labels = np.zeros(n, dtype=np.int64)
                splits, n_frames = [], np.zeros(n, dtype=np.int64)
                mask_all = np.zeros((n, t), dtype=bool)
                feat_bytes = int(np.prod((t, *c.feature_shape))) * np.dtype(c.dtype).itemsize
                for i, key in enumerate(keys):
                    source, handle = rows[key]
                    if source == "h5":
                        feats[i] = old["features"][handle]
                        mask_all[i] = old["mask"][handle]
                        label, split = int(old["label"][handle]), old["split"].asstr()[handle]
                        n_frames[i] = int(old["n_frames"][handle])
                    else:
                        jf.seek(handle.offset)
                        payload = jf.read(handle.length)
                        feats[i] = np.frombuffer(payload[:feat_bytes], dtype=c.dtype).reshape(t, *c.feature_shape)
                        mask_all[i] = np.frombuffer(payload[feat_bytes:], dtype=bool)
                        label, split = int(handle.header["label"]), handle.header["split"]
                        n_frames[i] = int(handle.header["n_frames"])
                    label, split = assignments.get(key, (label, split))
                    labels[i] = label
                    splits.append(split)
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
        finally:
            if old is not None:
                old.close()
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        if self.journal.exists():
            self.journal.unlink()
        self._existing = {k: i for i, k in enumerate(keys)}
        self._existing_failed = {k: failed[k] for k in failed_keys}
        self._journal_entries = {}
        return self.path


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def iter_journal(path: Path) -> Iterator[dict]:
    """Headers of the valid records of a journal (for inspection and tests)."""
    _, entries, _ = _read_journal(Path(path))
    for e in entries:
        yield e.header
