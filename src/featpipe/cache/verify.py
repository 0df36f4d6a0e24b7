"""Verifying a cache: read every row back, checking each row's checksum, every mask, every row's frame times
(version 4) and every part file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from featpipe.cache.reader import damaged_message, open_h5, part_clips, part_message, part_problems, row_reads
from featpipe.cache.schema import MASK_CRC, mask_damage, time_damage
from featpipe.errors import CacheError

# ----------------------------------------------------------------------------- checksums
# Features are stored with HDF5's fletcher32 filter (one checksum per row, see write_temporary).
# HDF5 refuses to read a chunk whose checksum does not match ("filter returned failure during
# read", an OSError); these helpers turn that into a sentence naming the damaged clips. Caches
# written before checksums (no filter) read as before; `verify_cache` says they carry none.

_VERIFY_ROWS = 64  # rows per read while verifying; a failing block is re-read row by row


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
    bad_times: list[str] = field(default_factory=list)  # ... whose frame times do not fit their mask

    def line(self) -> str:
        if self.damaged:
            out = [part_message(self.path, name, why, clips) for name, why, clips in self.bad_parts]
            if self.bad_features:
                out.append(damaged_message(self.path, self.bad_features))
            if self.bad_masks:
                out.append(damaged_message(self.path, self.bad_masks, what="frame mask"))
            if self.bad_times:
                out.append(damaged_message(self.path, self.bad_times, what="frame times"))
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
        bad_parts = [(f["parts/file"].asstr()[i], why, part_clips(f, i)) for i, why in sorted(problems.items())]
        in_bad_parts = [v for _, _, clips in bad_parts for v in clips]
        skip = set(in_bad_parts)
        bad_features: list[str] = []
        for start in range(0, n, _VERIFY_ROWS):
            stop = min(start + _VERIFY_ROWS, n)
            try:
                ds[start:stop]
            except OSError:
                bad_features += [
                    str(videos[r]) for r in range(start, stop) if str(videos[r]) not in skip and not row_reads(ds, r)
                ]
        mask = f["mask"][()] if "mask" in f else np.zeros((n, 0), dtype=bool)
        bad_masks = [str(videos[r]) for r in mask_damage(mask, f[MASK_CRC][()] if MASK_CRC in f else None)]
        bad_times = [str(videos[r]) for r in time_damage(f["time"][()], mask)] if "time" in f else []
        bad_times = [v for v in bad_times if v not in bad_masks]  # a damaged mask is named once, as such
        damaged = list(dict.fromkeys([*in_bad_parts, *bad_features, *bad_masks, *bad_times]))
        return VerifyReport(
            path,
            n,
            has_checksums(f, path, skip=problems),
            damaged,
            bad_features,
            bad_masks,
            bad_parts,
            MASK_CRC in f,
            bad_times,
        )


def missing_parts(path) -> list[str]:
    """The datasets every finished cache has that ``path`` lacks (empty for a complete cache)."""
    with open_h5(Path(path)) as f:
        names = ("features", "mask", "label", "split", "video", "n_frames", "failed/video", "failed/reason")
        if int(f.attrs["schema_version"]) >= 4:
            names += ("time", "duration", "fps")
        return [name for name in names if name not in f]
