"""What a finalized cache holds: the pure step of ``CacheWriter.finalize``, with no HDF5 and no files.

From what the existing cache file holds (its rows, failures and dropped clips, each clip with the
identity it was recorded with), the journal's records (in the order they were written) and the
clips of the current dataset (key -> identity now), :func:`plan` decides which rows are kept from
the old file, which come from the journal, which are dropped and why, which clips stay recorded
as failed, and the order of the rows. ``featpipe.cache.writer`` then executes the plan.

Rules, in order:

- a journal record is later than the cache: it replaces the cache's row or failure for its clip,
  and of two records of one clip (a run interrupted and resumed) the later one wins;
- with the current dataset given, a row whose clip left it is dropped ("no longer in the
  dataset"), a row whose clip's file changed since it was extracted is dropped ("its file changed
  after it was extracted"), a row of unknown identity (a version 1 cache) is trusted and takes the
  clip's identity now; failures of clips that left the dataset are forgotten;
- dropped rows are listed as stale (names and reasons only), and a clip that has a row again is
  no longer stale;
- a cache written as one file (its features fit ``one_file_limit``) has its rows sorted by key; a
  cache in part files keeps its old rows first, in their old order, then the journal's, sorted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from featpipe.cache.schema import Identity

GONE = "no longer in the dataset"
CHANGED = "its file changed after it was extracted"


@dataclass(frozen=True)
class Record:
    """One clip as recorded: a row (``error`` None) or a failure, with the identity it was recorded with."""

    key: str
    error: str | None = None
    identity: Identity | None = None


@dataclass(frozen=True)
class Existing:
    """What the existing cache file holds (all empty when there is none)."""

    rows: Mapping[str, int] = field(default_factory=dict)  # clip key -> its row in the file
    failed: Mapping[str, str] = field(default_factory=dict)  # clip key -> why it failed
    identity: Mapping[str, Identity | None] = field(default_factory=dict)  # rows and failures -> identity
    stale: Mapping[str, str] = field(default_factory=dict)  # clips dropped earlier -> why


@dataclass
class Plan:
    """What the final cache holds."""

    kept: dict[str, int]  # clip key -> its row in the old file, for rows kept from it
    new: list[str]  # rows that come from the journal, sorted by key
    order: list[str]  # every row, in the order written
    one_file: bool  # written as one file (rows sorted by key) rather than old parts + a new part
    failed: dict[str, str]  # clip key -> why, sorted by key
    identity: dict[str, Identity | None]  # every row and failure -> its identity (None: unknown)
    stale: dict[str, str]  # clips without a row that were dropped, now or earlier -> why
    dropped: dict[str, str] = field(default_factory=dict)  # rows this plan drops -> why (GONE or CHANGED)

    @property
    def n_dropped(self) -> int:
        return sum(why == GONE for why in self.dropped.values())

    @property
    def n_changed(self) -> int:
        return sum(why == CHANGED for why in self.dropped.values())


def plan(
    existing: Existing,
    journal: Iterable[Record],
    current: Mapping[str, Identity | None] | None = None,
    row_bytes: int = 0,
    one_file_limit: int = 0,
) -> Plan:
    """Reconcile the existing cache, the journal and the current dataset into what the final cache holds.

    ``current`` maps every clip key of the current dataset (or shard) -> its identity now (None when the
    file cannot be read); without it nothing is dropped. ``row_bytes`` (features per row) and
    ``one_file_limit`` (bytes) decide the layout: one file while the rows' features fit the limit.
    """
    source: dict[str, int | None] = dict(existing.rows)  # key -> row in the old file, None: from the journal
    ident: dict[str, Identity | None] = {k: existing.identity.get(k) for k in existing.rows}
    failed = {k: v for k, v in existing.failed.items() if k not in source}
    for key in failed:
        ident[key] = existing.identity.get(key)
    for rec in journal:  # later than the cache: a journal record wins, and a later record over an earlier one
        ident[rec.key] = rec.identity
        if rec.error is not None:
            source.pop(rec.key, None)
            failed[rec.key] = rec.error
        else:
            source[rec.key] = None
            failed.pop(rec.key, None)
    stale = dict(existing.stale)
    dropped: dict[str, str] = {}
    if current is not None:
        for key in list(source):
            now = current.get(key)
            if key not in current:
                dropped[key] = GONE
            elif ident[key] is not None and now is not None and ident[key] != now:
                dropped[key] = CHANGED
            else:
                if ident[key] is None:
                    ident[key] = now  # a version 1 row: trusted, identified from now on
                continue
            del source[key]
        stale.update(dropped)
        failed = {k: v for k, v in failed.items() if k in current}
    stale = {k: v for k, v in stale.items() if k not in source}
    keys = sorted(source)
    kept = {k: source[k] for k in keys if source[k] is not None}
    new = [k for k in keys if source[k] is None]
    one_file = len(keys) * row_bytes <= one_file_limit
    order = keys if one_file else sorted(kept, key=kept.__getitem__) + new
    failed = {k: failed[k] for k in sorted(failed)}
    identity = {k: ident.get(k) for k in keys + list(failed)}
    return Plan(kept, new, order, one_file, failed, identity, stale, dropped)
