"""Shards and merging: shard names, finding a set, merging it into one cache, and compacting a cache.

Shards. ``extract --shard I/N`` writes the clips whose key hashes to I (of N) into
``<stem>.shard-I-of-N<suffix>`` beside the cache, with its own journal and lock; every shard
records the full dataset's class names. ``merge_shards`` checks that a set is complete,
finished and made with one set of settings, and writes the cache an unsharded run would have
written, atomically: one file (rows sorted by clip key, copied one clip at a time) when small or
asked to compact, else the shards' part files hard-linked under the output's ``.parts/``.
The user-facing account is in docs/cache-format.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from featpipe.cache.lock import CacheLock
from featpipe.cache.parts import (
    Columns,
    Sources,
    collect_parts,
    one_file_limit,
    remove_stale_temporaries,
    replacing,
    sources_of,
    write_parted_temporary,
    write_temporary,
)
from featpipe.cache.reader import Row, RowReader, open_h5, read_h5_row
from featpipe.cache.schema import (
    WRITE_KEYS,
    CacheConfig,
    Identity,
    as_str,
    identities,
    journal_path,
    strings,
    write_error,
)
from featpipe.errors import CacheError, CannotWrite, FeatpipeError
from featpipe.options import as_paths, check_file_option

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
    if compact and shards and len(_unique_paths(shards)) == 1 and is_whole_cache(_unique_paths(shards)[0]):
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
            with replacing(output) as tmp:
                with ExitStack() as files:  # the shards are closed before the rename
                    ordered = _check_set([_open_shard(files, p) for p in paths], output if not shards else None)
                    collect_parts(output)  # we hold the output's lock: parts of a killed merge
                    _merge_into_temporary(ordered, output, tmp, compact)
            collect_parts(output)  # parts of the replaced output
        except OSError as exc:
            raise write_error(exc, output, "the shards are unchanged") from None
    return output


# ----------------------------------------------------------------------------- merging shards


@dataclass
class _Shard:
    path: Path
    file: object  # the open h5py.File
    config: CacheConfig
    index: int
    count: int


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
        index, count = parse_shard(as_str(spec))
    except FeatpipeError:
        raise CacheError(f"'{path}' has a damaged shard attribute ({as_str(spec)!r}); re-extract that shard.") from None
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


def is_whole_cache(path: Path) -> bool:
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
            with replacing(output) as tmp, open_h5(path) as f:  # the cache is closed before the rename
                config = CacheConfig.from_attrs(dict(f.attrs))
                keys = list(f["video"].asstr()[:])
                at = {k: i for i, k in enumerate(keys)}
                failed_keys = strings(f, "failed/video")
                failed = dict(zip(failed_keys, strings(f, "failed/reason")))
                f_ident = identities(f["failed"], len(failed_keys)) if "failed" in f else []
                stale = dict(zip(strings(f, "stale/video"), strings(f, "stale/reason")))
                remove_stale_temporaries(output)
                read = RowReader(f)
                write_temporary(
                    tmp,
                    config,
                    sorted(keys),
                    lambda k: read(at[k]),
                    failed,
                    failed_identity={k: i for k, i in zip(failed_keys, f_ident) if i},
                    stale=stale,
                )
        except OSError as exc:
            raise write_error(exc, output, f"'{path}' is unchanged") from None
        collect_parts(output)
    return output


def _merge_into_temporary(ordered: list[_Shard], output: Path, tmp: Path, compact: bool = False) -> None:
    """Write the merge of the shards ``ordered`` into ``tmp``, which will replace ``output``."""
    rows: dict[str, tuple[_Shard, int]] = {}  # clip key -> (shard, row)
    failed: dict[str, str] = {}
    failed_identity: dict[str, Identity] = {}
    stale: dict[str, str] = {}
    for s in ordered:
        for row, key in enumerate(s.file["video"].asstr()[:]):
            if key in rows:
                other, other_row = rows[key]
                if not _same_row(read_h5_row(other.file, other_row), read_h5_row(s.file, row)):
                    raise CacheError(
                        f"Clip '{key}' is in both '{other.path}' and '{s.path}' with different contents; the shards "
                        f"were not extracted from the same data. Re-extract one of them."
                    )
                continue
            rows[key] = (s, row)
        failed_keys = strings(s.file, "failed/video")
        idents = identities(s.file["failed"], len(failed_keys)) if "failed" in s.file else []
        for key, reason, ident in zip(failed_keys, strings(s.file, "failed/reason"), idents):
            failed.setdefault(key, reason)
            if ident is not None:
                failed_identity.setdefault(key, ident)
        for key, reason in zip(strings(s.file, "stale/video"), strings(s.file, "stale/reason")):
            stale.setdefault(key, reason)
    failed = {k: v for k, v in failed.items() if k not in rows}
    stale = {k: v for k, v in stale.items() if k not in rows}
    first = ordered[0].config
    config = dataclasses.replace(first, extra={k: v for k, v in first.extra.items() if k != "shard"})
    remove_stale_temporaries(output)  # we hold the output's lock: these are from killed runs
    feat_bytes = int(np.prod((config.frames, *config.feature_shape))) * np.dtype(config.dtype).itemsize
    if compact or len(rows) * feat_bytes <= one_file_limit():
        readers = {id(s): RowReader(s.file) for s in ordered}
        write_temporary(
            tmp,
            config,
            sorted(rows),
            lambda key: readers[id(rows[key][0])](rows[key][1]),
            failed,
            failed_identity=failed_identity,
            stale=stale,
        )
        return
    # O(shards) in features: link each shard's files, write only the small columns (rows grouped by shard)
    pieces: list[Columns] = []
    files, counts, index, row = [], [], [], []
    for s in ordered:
        videos = s.file["video"].asstr()[:]
        take = np.array([rows[k][0] is s and rows[k][1] == i for i, k in enumerate(videos)], dtype=bool)
        at = np.flatnonzero(take)
        src = sources_of(s.file, s.path)
        index.append(src.index[at] + len(files))
        row.append(src.row[at])
        files += src.files
        counts += src.rows
        pieces.append(Columns.read(s.file, at))
    src = Sources(files, counts, np.concatenate(index), np.concatenate(row))
    write_parted_temporary(
        tmp, output, config, Columns.concat(pieces, config.frames), src, failed, failed_identity, stale
    )


def _same_row(a: Row, b: Row) -> bool:
    return (
        np.array_equal(a.features, b.features)
        and np.array_equal(a.mask, b.mask)
        and (a.label, a.split, a.n_frames) == (b.label, b.split, b.n_frames)
        and np.array_equal(a.times, b.times, equal_nan=True)
        and np.array_equal([a.duration, a.fps], [b.duration, b.fps], equal_nan=True)
    )
