"""The journal beside a cache being extracted: one checksummed record per finished clip.

A record torn by a kill fails its checksum and ends the valid part of the journal; see
featpipe.cache.writer for how the journal is folded into the cache. A record's JSON header carries
the clip's frame times (``times``: the kept frames' times; ``duration``, ``fps``) when they are
known; records written by a featpipe from before frame times have none, and read as not recorded.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from featpipe.cache.schema import CacheConfig, ClipRecord, padded_times
from featpipe.runtime.atomic import write_bytes

_JOURNAL_MAGIC = b"FEATPIPE-JOURNAL-1\n"
_RECORD_MAGIC = b"FPR1"
_RECORD_HEAD = struct.Struct("<4sII")  # magic, header length, payload length
_CRC = struct.Struct("<I")


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
        header.update(_timing(rec))
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


def _timing(rec: ClipRecord) -> dict:
    """The header fields of a clip's frame times: the kept frames' times, duration and fps, each when known
    (plain JSON: a NaN is left out, never written)."""
    out: dict = {}
    if rec.times is not None:
        times = np.asarray(rec.times, dtype=np.float32)[np.asarray(rec.mask, dtype=bool)]
        if len(times) and not np.isnan(times).any():
            out["times"] = [float(x) for x in times]  # a float32 as a float64: exact both ways
    for name in ("duration", "fps"):
        value = float(getattr(rec, name))
        if np.isfinite(value):
            out[name] = value
    return out


def header_times(header: dict, frames: int) -> tuple[np.ndarray, float, float]:
    """(time (frames,) float32 with NaN padding, duration, fps) of a journal record; NaN where not recorded."""
    times = header.get("times")
    return (
        padded_times(times, frames),
        float(header.get("duration", float("nan"))),
        float(header.get("fps", float("nan"))),
    )


@dataclass
class JournalEntry:
    header: dict
    offset: int  # file offset of the payload
    length: int  # payload length


def read_journal(path: Path) -> tuple[dict | None, list[JournalEntry], int]:
    """Return (config attrs, valid entries, offset just past the last valid record).

    A missing/torn header gives (None, [], 0); a torn or corrupt record ends the valid part.
    """
    entries: list[JournalEntry] = []
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
            entries.append(JournalEntry(header, good_end + _RECORD_HEAD.size + hlen, plen))
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
            header = _JOURNAL_MAGIC + struct.pack("<I", len(raw)) + raw + _CRC.pack(zlib.crc32(raw))
            write_bytes(path, header, tmp=path.with_name(path.name + ".new"))
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


def iter_journal(path: Path) -> Iterator[dict]:
    """Headers of the valid records of a journal (for inspection and tests)."""
    _, entries, _ = read_journal(Path(path))
    for e in entries:
        yield e.header
