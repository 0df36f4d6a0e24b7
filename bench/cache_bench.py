"""Cache growth benchmark: what does adding clips to, and merging shards into, a big cache cost?

For each size (default 1k, 10k and 50k clips of 20 x 2048 float16 features, 80 KiB a clip, so
about 0.08, 0.8 and 4 GB) one cache is synthesised in part files (schema 3) with the library's
own writers, then timed, each as a user would run it (wall time, one process):

``add 1`` / ``add 10``
    ``CacheWriter(cache)``, ``append`` 1 (then 10) new clips, ``finalize``: open, journal, fold
    into the cache. Schema 3 writes one new part file of the new clips and rewrites the small
    columns only; the old code rewrote every row (6.1 s for 1 clip into 10k clips).
``rewrite``
    ``compact_cache``: the whole cache written as one file, row by row -- the work the old
    ``finalize`` (and the old ``merge``) did for every change; also what ``merge --compact``
    costs. Skipped above ``--rewrite-max`` clips (default 10k) to spare the disk and the time.
``merge 8``
    ``merge_shards`` of 8 shards holding the same clips (``shard_of`` of each key): hard links
    of the shards' part files plus the small columns. To spare disk, the 8 shards' part files
    are hard links of ranges of the cache's one part file (each shard's rows contiguous in it,
    as a shard's own extraction writes them); the merge does the same work either way.

Targets (issue 11): add 10 clips to a 50k-clip cache <= 2 s; merge 8 shards <= 2 s whatever
their size. Part files are used at every size (``FEATPIPE_ONE_FILE_MB=0`` unless set; by
default a cache up to 64 MB is one file, which is how 1k clips would be written after the first
add). ``df -h`` first: the 50k cache needs about 4.2 GB in ``--dir`` (default a temp dir
under /tmp, removed at the end).

    python bench/cache_bench.py                          # 1k, 10k, 50k (minutes, ~4.2 GB)
    python bench/cache_bench.py --sizes 1000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from featpipe import cache as fc

T, D = 20, 2048


def config(shard: str | None = None) -> fc.CacheConfig:
    extra = {"shard": shard} if shard else {}
    return fc.CacheConfig(
        backbone="inceptionv3",
        weights="imagenet",
        weights_fingerprint="bench",
        input_size=299,
        frames=T,
        sampling="uniform",
        dtype="float16",
        feature_shape=(D,),
        class_names=tuple(f"class{i:03d}" for i in range(100)),
        extra=extra,
    )


def key(i: int) -> str:
    return f"{('train', 'val', 'test')[i % 3]}/class{i % 100:03d}/clip{i:07d}.mp4"


def columns(keys: list[str]) -> fc._Columns:
    n = len(keys)
    label = np.array([int(k.split("/")[1][5:]) for k in keys], dtype=np.int64)
    return fc._Columns(
        list(keys),
        np.ones((n, T), dtype=bool),
        label,
        [k.split("/")[0] for k in keys],
        np.full(n, 250, dtype=np.int64),
        np.arange(n, dtype=np.int64) + 10_000,
        np.full(n, 1_700_000_000_000_000_000, dtype=np.int64),
    )


def synthesise(path: Path, n: int, shards: int) -> list[str]:
    """A cache of ``n`` clips in one part file, rows grouped by shard; return the keys in part order."""
    by_shard: dict[int, list[str]] = {}
    for i in range(n):
        by_shard.setdefault(fc.shard_of(key(i), shards), []).append(key(i))
    keys = [k for s in sorted(by_shard) for k in sorted(by_shard[s])]
    rng = np.random.default_rng(0)
    block = rng.standard_normal((64, T, D)).astype(np.float16)
    part = fc._write_part(fc.parts_dir(path), config(), n, (block[i % 64] for i in range(n)))
    src = fc._Sources([part], [n], np.zeros(n, dtype=np.int64), np.arange(n, dtype=np.int64))
    fc._install(fc._write_parted_temporary(path, config(), columns(keys), src, {}, {}, {}), path)
    return keys


def make_shards(path: Path, keys: list[str], shards: int) -> None:
    """Shard files of ``path`` whose features are ranges of ``path``'s part file (hard links, no copies)."""
    with fc.open_h5(path) as f:
        part = fc._sources_of(f, path).files[0]
    start = 0
    for s in range(1, shards + 1):
        mine = [k for k in keys if fc.shard_of(k, shards) == s]
        src = fc._Sources(
            [part],
            [len(keys)],
            np.zeros(len(mine), dtype=np.int64),
            np.arange(start, start + len(mine), dtype=np.int64),
        )
        target = fc.shard_path(path, s, shards)
        fc._install(fc._write_parted_temporary(target, config(f"{s}/{shards}"), columns(mine), src, {}, {}, {}), target)
        start += len(mine)


def add(path: Path, first: int, count: int) -> float:
    rng = np.random.default_rng(first)
    recs = [
        fc.ClipRecord(key(first + i), 0, "train", 250, rng.standard_normal((T, D)).astype(np.float16), np.ones(T, bool))
        for i in range(count)
    ]
    recs = [replace(r, label=int(r.video.split("/")[1][5:]), split=r.video.split("/")[0]) for r in recs]
    t0 = time.perf_counter()
    with fc.CacheLock(path):
        w = fc.CacheWriter(path, config())
        for r in recs:
            w.append(r)
        w.finalize()
    return time.perf_counter() - t0


def run(size: int, folder: Path, rewrite_max: int, shards: int) -> dict:
    here = folder / f"n{size}"
    here.mkdir()
    path = here / "cache.h5"
    t0 = time.perf_counter()
    keys = synthesise(path, size, shards)
    out = {"clips": size, "gigabytes": round(size * T * D * 2 / 1e9, 2), "synthesise_s": time.perf_counter() - t0}
    make_shards(path, keys, shards)
    t0 = time.perf_counter()
    fc.merge_shards(fc.find_shards(path), output=here / "merged.h5")
    out[f"merge_{shards}_s"] = time.perf_counter() - t0
    with fc.open_h5(here / "merged.h5") as f:
        assert len(f["video"]) == size and f["features"].is_virtual
    out["add_1_s"] = add(path, size, 1)
    out["add_10_s"] = add(path, size + 1, 10)
    assert fc.summarize(path).n_clips == size + 11 and fc.summarize(path).parts == 3
    if size <= rewrite_max:
        t0 = time.perf_counter()
        fc.compact_cache(path, here / "one.h5")
        out["rewrite_s"] = time.perf_counter() - t0
    shutil.rmtree(here)
    return out


def table(results: list[dict], shards: int) -> str:
    lines = [
        f"| clips | features | add 1 clip | add 10 clips | merge {shards} shards "
        f"| rewrite all (old finalize, `--compact`) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rewrite = f"{r['rewrite_s']:.1f} s" if "rewrite_s" in r else "not run"
        lines.append(
            f"| {r['clips']:,} | {r['gigabytes']} GB | {r['add_1_s']:.2f} s | {r['add_10_s']:.2f} s | "
            f"{r[f'merge_{shards}_s']:.2f} s | {rewrite} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 50_000])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--rewrite-max", type=int, default=10_000, help="time the full rewrite up to this many clips")
    ap.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp dir, removed)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="cache-bench-", dir=args.dir))
    before = os.environ.get("FEATPIPE_ONE_FILE_MB")
    os.environ.setdefault("FEATPIPE_ONE_FILE_MB", "0")  # small --sizes too are measured in part files
    try:
        results = []
        for size in args.sizes:
            results.append(run(size, folder, args.rewrite_max, args.shards))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if before is None:
            os.environ.pop("FEATPIPE_ONE_FILE_MB", None)
    print(table(results, args.shards))
    if args.json:
        args.json.write_text(json.dumps({"results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
