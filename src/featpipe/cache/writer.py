"""The resumable cache writer: journal finished clips, then fold cache + journal into a new cache file.

Crash safety. The HDF5 file is never modified in place. While extracting, every finished clip
is appended to a journal beside the cache (``<cache>.journal``) as one checksummed record; a
record torn by a kill fails its checksum and is dropped on the next open. At the end
(``finalize``) ``featpipe.cache.reconcile`` decides what the new cache holds, the new rows go
into a new part file (or, for a one-file cache, old rows + journal rows are rewritten in key
order), a new cache file is written beside the old one and atomically replaces it, and only
then is the journal removed; part files a killed finalize left unreferenced are removed by the
next writer. So a SIGKILL at any moment loses at most the clips in flight, and the next run
resumes from cache + journal and ends with the same cache a clean run produces. An exclusive
lock (``<cache>.lock``, released by the OS when the process dies) stops two extractions from
writing one cache at once. The user-facing account is in docs/cache-format.md.
"""

from __future__ import annotations

import dataclasses
import itertools
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from featpipe.cache import reconcile
from featpipe.cache.journal import JournalEntry, JournalWriter, header_times, read_journal
from featpipe.cache.parts import (
    PART_BYTES,
    Columns,
    Sources,
    collect_parts,
    one_file_limit,
    remove_stale_temporaries,
    replacing,
    row_bytes,
    sources_of,
    write_one_file_temporary,
    write_part,
    write_parted_temporary,
)
from featpipe.cache.reader import Row, open_h5
from featpipe.cache.schema import (
    UNKNOWN,
    WRITE_KEYS,
    CacheConfig,
    ClipRecord,
    Identity,
    header_identity,
    identities,
    journal_path,
    parts_dir,
    strings,
    write_error,
)
from featpipe.errors import CacheError


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
            remove_stale_temporaries(self.path)  # a finalize killed before its rename; the old cache is intact
        self._existing = reconcile.Existing()  # what the cache file holds
        self.existing_attrs: dict | None = None  # the cache's (or else the journal's) attributes
        self._checked: list[tuple[CacheConfig, str]] = []  # what opening checked the config against
        if self.path.exists():
            with open_h5(self.path) as f:
                self.existing_attrs = dict(f.attrs)
                theirs = CacheConfig.from_attrs(self.existing_attrs)
                self._check(theirs, f"the existing cache '{self.path}'")
                keys = list(f["video"].asstr()[:])
                identity = dict(zip(keys, identities(f, len(keys))))
                failed_keys = strings(f, "failed/video")
                if "failed" in f:
                    identity.update(zip(failed_keys, identities(f["failed"], len(failed_keys))))
                self._existing = reconcile.Existing(
                    rows=dict(zip(keys, range(len(keys)))),
                    failed=dict(zip(failed_keys, strings(f, "failed/reason"))),
                    identity=identity,
                    stale=dict(zip(strings(f, "stale/video"), strings(f, "stale/reason"))),
                )
        if writable:
            collect_parts(self.path)  # part files of a finalize killed before its rename, or of dropped rows
        self._journal_entries: dict[str, JournalEntry] = {}
        if self.journal.exists():
            attrs, entries, end = read_journal(self.journal)
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
        for key in self._existing.rows:
            out[key] = (None, self._existing.identity.get(key))
        for key, reason in self._existing.failed.items():
            if key not in out:
                out[key] = (reason, self._existing.identity.get(key))
        for header in [e.header for e in self._journal_entries.values()] + list(self._appended.values()):
            out.pop(header["video"], None)
            out[header["video"]] = (header.get("error"), header_identity(header))
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
            _, entries, _ = read_journal(self.journal)
            self._journal_entries = {}
            for e in entries:
                self._journal_entries.pop(e.header["video"], None)
                self._journal_entries[e.header["video"]] = e
        self._appended = {}
        assignments = assignments or {}
        records = self._journal_entries.items()
        journal = [reconcile.Record(k, e.header.get("error"), header_identity(e.header)) for k, e in records]
        plan = reconcile.plan(self._existing, journal, current, row_bytes(self.config), one_file_limit())
        self.n_dropped, self.n_changed = plan.n_dropped, plan.n_changed
        try:
            with replacing(self.path) as tmp:
                with ExitStack() as stack:  # the old cache is closed before the rename (Windows cannot replace it open)
                    old = stack.enter_context(open_h5(self.path)) if self._existing.rows else None
                    jf = stack.enter_context(open(self.journal, "rb")) if self.journal.exists() else None
                    if plan.one_file:
                        self._write_one_file(tmp, old, jf, plan, assignments)
                    else:  # O(new clips): old rows stay where they are, new ones go into one new part file
                        self._write_parts(tmp, old, jf, plan, assignments)
            collect_parts(self.path)
        except OSError as exc:
            kept = (
                "the old cache and the clips finished since are kept"
                if self.path.exists()
                else "the clips finished so far are kept"
            )
            raise write_error(exc, self.path, kept) from None
        if self.journal.exists():
            self.journal.unlink()
        self._existing = reconcile.Existing(  # a cache in part files keeps old rows first
            {k: i for i, k in enumerate(plan.order)}, plan.failed, plan.identity, plan.stale
        )
        self._journal_entries = {}
        return self.path

    def _journal_row(self, jf, key: str, plan: reconcile.Plan, assignments) -> Row:
        """Clip ``key``'s row from the journal (open as ``jf``), with its identity and assignment applied."""
        c = self.config
        entry = self._journal_entries[key]
        jf.seek(entry.offset)
        payload = jf.read(entry.length)
        feat_bytes = row_bytes(c)
        features = np.frombuffer(payload[:feat_bytes], dtype=c.dtype).reshape(c.frames, *c.feature_shape)
        size, mtime_ns = _stamp(plan, key)
        label, split = assignments.get(key, (entry.header["label"], entry.header["split"]))
        return Row(
            features,
            np.frombuffer(payload[feat_bytes:], dtype=bool),
            int(label),
            split,
            int(entry.header["n_frames"]),
            size,
            mtime_ns,
            *header_times(entry.header, c.frames),
        )

    def _write_one_file(self, tmp: Path, old, jf, plan: reconcile.Plan, assignments) -> None:
        """The cache as one file (rows by key): what ``write_temporary`` writes, with the old rows' features
        copied in slabs and their small columns read whole (a Python call per row cost ~1 ms per old row:
        adding 10 clips to a 20,000-row cache took 20 s); the journal's rows are read one by one."""
        c = self.config
        keys = plan.order
        n = len(keys)
        at = np.array([plan.kept.get(k, -1) for k in keys], dtype=np.int64)
        mine = np.flatnonzero(at >= 0)  # rows copied from the old cache, at rows at[mine] there
        cols = Columns.read(old, at[mine], keys=[keys[i] for i in mine]) if len(mine) else None
        mask = np.zeros((n, c.frames), dtype=bool)
        labels, n_frames = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        time = np.full((n, c.frames), np.nan, dtype=np.float32)
        duration, fps = np.full(n, np.nan, dtype=np.float32), np.full(n, np.nan, dtype=np.float32)
        splits: list = [""] * n
        if cols is not None:
            mask[mine], labels[mine], n_frames[mine] = cols.mask, cols.label, cols.n_frames
            time[mine], duration[mine], fps[mine] = cols.time, cols.duration, cols.fps
            for i, sp in zip(mine.tolist(), cols.split):
                splits[i] = sp
        fresh: dict[int, np.ndarray] = {}
        for i in np.flatnonzero(at < 0).tolist():
            row = self._journal_row(jf, keys[i], plan, assignments)
            fresh[i] = row.features
            mask[i], labels[i], n_frames[i], splits[i] = row.mask, row.label, row.n_frames, row.split
            time[i], duration[i], fps[i] = row.times, row.duration, row.fps
        for i, key in enumerate(keys):
            if key in assignments:
                labels[i], splits[i] = int(assignments[key][0]), assignments[key][1]
        idents = [_stamp(plan, key) for key in keys]
        sizes = np.array([x[0] for x in idents], dtype=np.int64)
        mtimes = np.array([x[1] for x in idents], dtype=np.int64)
        columns = (mask, labels, splits, n_frames, sizes, mtimes)
        timing = (time, duration, fps)
        write_one_file_temporary(tmp, c, keys, old, at, fresh, *columns, *_failures(plan), timing=timing)

    def _write_parts(self, tmp: Path, old, jf, plan: reconcile.Plan, assignments) -> None:
        """The cache as the old rows the plan keeps (read where they are) + its new rows in one new part."""
        c = self.config
        kept = [k for k in plan.order if k in plan.kept]
        kept_rows = [plan.kept[k] for k in kept]
        new = plan.new
        pieces: list[Columns] = []
        src = Sources([], [], np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
        if kept:
            at = np.asarray(kept_rows, dtype=np.int64)
            # the keys are known (row at[i] holds kept[i]), and so are the splits when every row has an
            # assignment: not read back and decoded one string per row
            assigned = all(key in assignments for key in kept)
            cols = Columns.read(old, at, keys=kept, splits=[assignments[k][1] for k in kept] if assigned else None)
            idents = [_stamp(plan, key) for key in kept]
            cols.size = np.array([i[0] for i in idents], dtype=np.int64)
            cols.mtime_ns = np.array([i[1] for i in idents], dtype=np.int64)
            if assigned:
                cols.label = np.array([assignments[k][0] for k in kept], dtype=np.int64)
            else:
                for i, key in enumerate(kept):
                    if key in assignments:
                        cols.label[i], cols.split[i] = int(assignments[key][0]), assignments[key][1]
            pieces.append(cols)
            whole = sources_of(old, self.path)
            src = Sources(whole.files, whole.rows, whole.index[at], whole.row[at])
        if new:
            fresh = Columns(
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
                    row = self._journal_row(jf, key, plan, assignments)
                    fresh.keys.append(key)
                    fresh.split.append(row.split)
                    fresh.mask[i], fresh.label[i], fresh.n_frames[i] = row.mask, row.label, row.n_frames
                    fresh.size[i], fresh.mtime_ns[i] = row.size, row.mtime_ns
                    fresh.time[i], fresh.duration[i], fresh.fps[i] = row.times, row.duration, row.fps
                    yield row.features

            # parts of at most PART_BYTES, each built in memory (see _h5_create): HDF5 never meets a full disk
            per_part = max(1, PART_BYTES // row_bytes(c))
            rows = features()
            for first in range(0, len(new), per_part):
                count = min(per_part, len(new) - first)
                part = write_part(parts_dir(self.path), c, count, itertools.islice(rows, count))
                src = Sources(
                    src.files + [part],
                    src.rows + [count],
                    np.concatenate([src.index, np.full(count, len(src.files), dtype=np.int64)]),
                    np.concatenate([src.row, np.arange(count, dtype=np.int64)]),
                )
            pieces.append(fresh)
        write_parted_temporary(tmp, self.path, c, Columns.concat(pieces, c.frames), src, *_failures(plan))


def _stamp(plan: reconcile.Plan, key: str) -> tuple[int, int]:
    """The (size, mtime_ns) a row or failure is written with: its identity, or UNKNOWN twice."""
    return plan.identity.get(key) or (UNKNOWN, UNKNOWN)


def _failures(plan: reconcile.Plan) -> tuple[dict, dict, dict]:
    """The failed/ and stale/ groups of the plan's cache: (failed, their identities, stale)."""
    return plan.failed, {k: _stamp(plan, k) for k in plan.failed}, plan.stale
