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

``extract +10`` (``--command-sizes``, default 1k and 20k)
    The whole ``featpipe extract`` command, in a new process as a user runs it (start-up, indexing
    the folder, one ``stat`` per clip, opening the cache, decoding and journalling the new clips,
    finalize, the summary), adding 10 new real clips (the fixtures in ``--clips``) to a folder of N
    clips that the cache already holds. The N old clips are empty files and their rows are
    synthesised with the identity (size, mtime) the files have, so extract reuses every one of them;
    the cache is put back between repeats. The caches are in part files like the rest of this benchmark;
    with ``FEATPIPE_ONE_FILE_MB=1000`` set, they are one file each (3 KB a clip), rewritten on each
    add. Backbone ``raw`` at 16 px and 4 frames: the smallest fixed
    cost, so the ratio shows the per-clip cost at its plainest. Reported: the median of
    ``--repeat`` runs (sizes interleaved, so load on a shared machine falls on all of them), each
    size's ratio to the smallest, the cost per existing clip, and the floor: one ``os.stat`` per clip.
    Wall time is what the issue measures; the CPU time (user + system) of the same process is given
    beside it, as it varies less when other jobs share the machine.

Targets (issue 11): add 10 clips to a 50k-clip cache <= 2 s; merge 8 shards <= 2 s whatever
their size. Issue 19: ``extract`` adding 10 clips to 20k clips <= 1.3 x adding them to 1k clips.
Part files are used at every size (``FEATPIPE_ONE_FILE_MB=0`` unless set; by
default a cache up to 64 MB is one file, which is how 1k clips would be written after the first
add). ``df -h`` first: the 50k cache needs about 4.2 GB in ``--dir`` (default a temp dir
under /tmp, removed at the end).

    python bench/cache_bench.py                          # 1k, 10k, 50k (minutes, ~4.2 GB); extract +10
    python bench/cache_bench.py --sizes 1000 --json out.json
    python bench/cache_bench.py --sizes --command-sizes 1000 20000 --repeat 5   # only extract +10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from featpipe.cache.lock import CacheLock
from featpipe.cache.parts import (
    Columns,
    Sources,
    one_file_limit,
    replacing,
    sources_of,
    write_part,
    write_parted_temporary,
    write_temporary,
)
from featpipe.cache.reader import Row, open_h5, read_config, summarize
from featpipe.cache.schema import CacheConfig, ClipRecord, file_identity, parts_dir
from featpipe.cache.shards import compact_cache, find_shards, merge_shards, shard_of, shard_path
from featpipe.cache.writer import CacheWriter

T, D = 20, 2048


def config(shard: str | None = None) -> CacheConfig:
    extra = {"shard": shard} if shard else {}
    return CacheConfig(
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


def columns(keys: list[str]) -> Columns:
    n = len(keys)
    label = np.array([int(k.split("/")[1][5:]) for k in keys], dtype=np.int64)
    return Columns(
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
        by_shard.setdefault(shard_of(key(i), shards), []).append(key(i))
    keys = [k for s in sorted(by_shard) for k in sorted(by_shard[s])]
    rng = np.random.default_rng(0)
    block = rng.standard_normal((64, T, D)).astype(np.float16)
    part = write_part(parts_dir(path), config(), n, (block[i % 64] for i in range(n)))
    src = Sources([part], [n], np.zeros(n, dtype=np.int64), np.arange(n, dtype=np.int64))
    with replacing(path) as tmp:
        write_parted_temporary(tmp, path, config(), columns(keys), src, {}, {}, {})
    return keys


def make_shards(path: Path, keys: list[str], shards: int) -> None:
    """Shard files of ``path`` whose features are ranges of ``path``'s part file (hard links, no copies)."""
    with open_h5(path) as f:
        part = sources_of(f, path).files[0]
    start = 0
    for s in range(1, shards + 1):
        mine = [k for k in keys if shard_of(k, shards) == s]
        src = Sources(
            [part],
            [len(keys)],
            np.zeros(len(mine), dtype=np.int64),
            np.arange(start, start + len(mine), dtype=np.int64),
        )
        target = shard_path(path, s, shards)
        with replacing(target) as tmp:
            write_parted_temporary(tmp, target, config(f"{s}/{shards}"), columns(mine), src, {}, {}, {})
        start += len(mine)


def add(path: Path, first: int, count: int) -> float:
    rng = np.random.default_rng(first)
    recs = [
        ClipRecord(key(first + i), 0, "train", 250, rng.standard_normal((T, D)).astype(np.float16), np.ones(T, bool))
        for i in range(count)
    ]
    recs = [replace(r, label=int(r.video.split("/")[1][5:]), split=r.video.split("/")[0]) for r in recs]
    t0 = time.perf_counter()
    with CacheLock(path):
        w = CacheWriter(path, config())
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
    merge_shards(find_shards(path), output=here / "merged.h5")
    out[f"merge_{shards}_s"] = time.perf_counter() - t0
    with open_h5(here / "merged.h5") as f:
        assert len(f["video"]) == size and f["features"].is_virtual
    out["add_1_s"] = add(path, size, 1)
    out["add_10_s"] = add(path, size + 1, 10)
    assert summarize(path).n_clips == size + 11 and summarize(path).parts == 3
    if size <= rewrite_max:
        t0 = time.perf_counter()
        compact_cache(path, here / "one.h5")
        out["rewrite_s"] = time.perf_counter() - t0
    shutil.rmtree(here)
    return out


FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "real"
NEW_CLIPS = 10
CLASSES = 10
COMMAND = ["--backbone", "raw", "--frames", "4", "--size", "16", "--quiet"]


def _extract(data: Path, output: Path) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one ``featpipe extract`` process (raises with its output if it
    fails). CPU time varies less than wall time where other jobs share the machine."""
    cmd = [sys.executable, "-m", "featpipe", "extract", "--data", str(data), "--output", str(output), *COMMAND]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _real_clips(clips: Path, scratch: Path) -> list[Path]:
    """The real clips to add: the fixtures, or where they are absent, small MPEG-4 clips written here."""
    found = sorted(p for p in clips.glob("*") if p.suffix.lower() in (".mp4", ".avi")) if clips.is_dir() else []
    if found:
        return found
    import cv2

    scratch.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(4):
        path = scratch / f"made{i}.mp4"
        w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (64, 48))
        for j in range(30):
            w.write(np.full((48, 64, 3), (i * 40 + j * 5) % 256, dtype=np.uint8))
        w.release()
        out.append(path)
    return out


def _place(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def _command_config(folder: Path, real: list[Path]) -> CacheConfig:
    """The settings ``COMMAND`` writes for CLASSES classes: from a real extraction of one clip per class."""
    probe = folder / "probe"
    for c in range(CLASSES):
        (probe / f"class{c:02d}").mkdir(parents=True)
        _place(real[c % len(real)], probe / f"class{c:02d}" / f"real{c}{real[c % len(real)].suffix}")
    _extract(probe, folder / "probe.h5")
    config = read_config(folder / "probe.h5")
    shutil.rmtree(probe)
    return config


def _command_dataset(folder: Path, n: int, config: CacheConfig) -> tuple[Path, Path, list[str]]:
    """A folder of ``n`` clips (empty files) in CLASSES class folders and a cache holding every one of them."""
    from featpipe.video.datasets import index_dataset

    data = folder / "data"
    for c in range(CLASSES):
        (data / f"class{c:02d}").mkdir(parents=True)
    for i in range(n):
        (data / f"class{i % CLASSES:02d}" / f"clip{i:07d}.mp4").touch()
    ds = index_dataset(data)
    config = dataclasses.replace(config, extra={**config.extra, "data_root": str(ds.root)})
    ident = [file_identity(r.path) for r in ds.records]
    t = config.frames
    cols = Columns(
        [r.video for r in ds.records],
        np.ones((n, t), dtype=bool),
        np.array([ds.label_index(r.label) for r in ds.records], dtype=np.int64),
        [r.split for r in ds.records],
        np.full(n, t, dtype=np.int64),
        np.array([i[0] for i in ident], dtype=np.int64),
        np.array([i[1] for i in ident], dtype=np.int64),
    )
    cache = folder / "cache.h5"
    zeros = np.zeros((t, *config.feature_shape), dtype=config.dtype)
    if n * zeros.nbytes <= one_file_limit():  # one file, as extract writes a cache this small
        rows = {
            k: Row(zeros, cols.mask[i], int(cols.label[i]), cols.split[i], t, int(size), int(mtime))
            for i, (k, size, mtime) in enumerate(zip(cols.keys, cols.size, cols.mtime_ns))
        }
        with replacing(cache) as tmp:
            write_temporary(tmp, config, cols.keys, rows.__getitem__, {})
        return data, cache, [str(r.path) for r in ds.records]
    part = write_part(parts_dir(cache), config, n, (zeros for _ in range(n)))
    src = Sources([part], [n], np.zeros(n, dtype=np.int64), np.arange(n, dtype=np.int64))
    with replacing(cache) as tmp:
        write_parted_temporary(tmp, cache, config, cols, src, {}, {}, {})
    return data, cache, [str(r.path) for r in ds.records]


def _stat_seconds(paths: list[str]) -> float:
    """The floor: one ``os.stat`` per clip (best of 3, warm)."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for p in paths:
            os.stat(p)
        best = min(best, time.perf_counter() - t0)
    return best


def run_command(sizes: list[int], folder: Path, repeat: int, clips: Path) -> dict:
    """``featpipe extract`` adding NEW_CLIPS real clips to caches of each size, interleaved, ``repeat`` times."""
    real = _real_clips(clips, folder / "made")
    config = _command_config(folder, real)
    setups = {}
    for n in sizes:
        here = folder / f"cmd{n}"
        here.mkdir()
        data, cache, paths = _command_dataset(here, n, config)
        for j in range(NEW_CLIPS):
            src = real[j % len(real)]
            _place(src, data / f"class{j % CLASSES:02d}" / f"new{j:02d}{src.suffix}")
        shutil.copyfile(cache, here / "before.h5")
        parts = {p.name for p in parts_dir(cache).iterdir()} if parts_dir(cache).is_dir() else set()
        setups[n] = (data, cache, here / "before.h5", parts, paths)
    seconds: dict[int, list[float]] = {n: [] for n in sizes}
    cpu: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(repeat):
        for n in sizes:
            data, cache, before, parts, _ = setups[n]
            shutil.copyfile(before, cache)  # the cache without the new clips again
            for p in parts_dir(cache).iterdir() if parts_dir(cache).is_dir() else ():
                if p.name not in parts:
                    p.unlink()
            wall, used = _extract(data, cache)
            seconds[n].append(wall)
            cpu[n].append(used)
            summary = summarize(cache)
            assert summary.n_clips == n + NEW_CLIPS and not summary.failed, summary.lines()
    base = sizes[0]
    out = {
        "new_clips": NEW_CLIPS,
        "command": "featpipe extract " + " ".join(COMMAND),
        "one_file_mb": os.environ.get("FEATPIPE_ONE_FILE_MB", "64 (default)"),
        "sizes": [],
    }
    for n in sizes:
        median = statistics.median(seconds[n])
        stat_s = _stat_seconds(setups[n][4])
        out["sizes"].append(
            {
                "clips": n,
                "seconds": seconds[n],
                "median_s": median,
                "ratio": median / statistics.median(seconds[base]),
                "cpu_seconds": cpu[n],
                "median_cpu_s": statistics.median(cpu[n]),
                "cpu_ratio": statistics.median(cpu[n]) / statistics.median(cpu[base]),
                "stat_us_per_clip": 1e6 * stat_s / n,
            }
        )
    for r in out["sizes"][1:]:
        extra = r["clips"] - base
        r["us_per_existing_clip"] = 1e6 * (r["median_s"] - out["sizes"][0]["median_s"]) / extra
        r["cpu_us_per_existing_clip"] = 1e6 * (r["median_cpu_s"] - out["sizes"][0]["median_cpu_s"]) / extra
    for n in sizes:
        shutil.rmtree(folder / f"cmd{n}")
    return out


def command_table(result: dict) -> str:
    base = result["sizes"][0]["clips"]
    lines = [
        f"| clips in the cache | `extract` + {result['new_clips']} clips, wall (CPU) | ratio to {base:,}, wall (CPU) "
        f"| per existing clip, wall (CPU) | floor: one `stat` per clip |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in result["sizes"]:
        per = (
            f"{r['us_per_existing_clip']:.0f} µs ({r['cpu_us_per_existing_clip']:.0f} µs)"
            if "us_per_existing_clip" in r
            else "-"
        )
        lines.append(
            f"| {r['clips']:,} | {r['median_s']:.2f} s ({r['median_cpu_s']:.2f} s) | {r['ratio']:.2f} "
            f"({r['cpu_ratio']:.2f}) | {per} | {r['stat_us_per_clip']:.1f} µs |"
        )
    return "\n".join(lines)


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
    ap.add_argument("--sizes", type=int, nargs="*", default=[1000, 10_000, 50_000])
    ap.add_argument(
        "--command-sizes",
        type=int,
        nargs="*",
        default=[1000, 20_000],
        help="time the whole `featpipe extract` adding 10 clips to caches of these sizes (the first is the base)",
    )
    ap.add_argument("--repeat", type=int, default=3, help="runs of each `extract` (the median is reported)")
    ap.add_argument("--clips", type=Path, default=FIXTURES, help="real clips to add (default: the shared fixtures)")
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
        command = run_command(args.command_sizes, folder, args.repeat, args.clips) if args.command_sizes else None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if before is None:
            os.environ.pop("FEATPIPE_ONE_FILE_MB", None)
    if results:
        print(table(results, args.shards))
    if command:
        print(command_table(command))
    if args.json:
        args.json.write_text(json.dumps({"results": results, **({"command": command} if command else {})}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
