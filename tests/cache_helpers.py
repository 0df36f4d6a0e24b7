"""Shared data and fixtures of the cache tests (tests/test_cache_*.py): a small config, clips, shards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np

from cli_args import cli
from featpipe.cache.schema import CacheConfig, ClipRecord, parts_dir
from featpipe.cache.shards import shard_of, shard_path
from featpipe.cache.writer import CacheWriter

T, D = 4, 3


CONFIG = CacheConfig(
    backbone="vgg16",
    weights="none",
    weights_fingerprint="abc123",
    input_size=32,
    frames=T,
    sampling="uniform",
    dtype="float16",
    feature_shape=(D,),
    class_names=("a", "b"),
)


def clip(i: int, key: str | None = None, real: int = 3) -> ClipRecord:
    feats = np.zeros((T, D), np.float16)
    feats[:real] = np.arange(real * D).reshape(real, D) + 10 * i
    mask = np.arange(T) < real
    return ClipRecord(key or f"train/a/clip{i}.mp4", i % 2, "train", 30 + i, feats, mask)


DATASETS = ("features", "mask", "label", "split", "video", "n_frames", "failed/video", "failed/reason")


KEYS = [f"{split}/{cls}/clip {i}.mp4" for split in ("train", "val", "test") for cls in ("a", "b") for i in range(6)]


def read_all(path) -> dict:
    with h5py.File(path, "r") as f:
        out = {name: f[name][()] for name in DATASETS}
        out["attrs"] = {k: np.asarray(v).tolist() for k, v in f.attrs.items()}
    return out


def write_clips(path, keys, config=CONFIG, failed=()) -> None:
    """A cache holding clip(i) under each key, plus failed clips; for a shard pass its config."""
    w = CacheWriter(path, config)
    for key in keys:
        w.append(clip(KEYS.index(key) if key in KEYS else 0, key))
    for key in failed:
        w.append(ClipRecord(key, 0, "train", 0, error=f"{key} is broken"))
    w.finalize()


def write_shards(out, n, keys=KEYS, failed=("train/a/broken.mp4", "val/b/broken.mp4")) -> list:
    """Shards 1..n of ``out`` as `extract --shard` writes them: each clip in the shard its key hashes to."""
    paths = []
    for i in range(1, n + 1):
        paths.append(shard_path(out, i, n))
        write_clips(
            paths[-1],
            [k for k in keys if shard_of(k, n) == i],
            replace(CONFIG, extra={"shard": f"{i}/{n}"}),
            failed=[k for k in failed if shard_of(k, n) == i],
        )
    return paths


def merge_cli(*args):
    return cli("merge", *args)


def refused(result, *words) -> str:
    """Exit 2 and one sentence on stderr that contains every one of ``words``."""
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.startswith("error: ") and len(message.splitlines()) == 1, message
    for word in words:
        assert word in message, (word, message)
    return message


IDENT = {f"train/a/clip{i}.mp4": (1000 + i, 5_000_000_000 + i) for i in range(4)}


def identified(i: int, key: str | None = None) -> ClipRecord:
    rec = clip(i, key)
    return replace(rec, size=IDENT.get(rec.video, (1, 1))[0], mtime_ns=IDENT.get(rec.video, (1, 1))[1])


def downgrade_to_version_1(path) -> None:
    with h5py.File(path, "a") as f:
        for name in ("size", "mtime_ns", "failed/size", "failed/mtime_ns", "stale", *TIME_COLUMNS):
            del f[name]
        f.attrs["schema_version"] = 1


TIME_COLUMNS = ("time", "duration", "fps")


def downgrade_to_version_3(path) -> None:
    """Make a cache what featpipe wrote before frame times: version 3, no time/duration/fps columns."""
    with h5py.File(path, "a") as f:
        for name in TIME_COLUMNS:
            del f[name]
        f.attrs["schema_version"] = 3


def by_key(path) -> dict:
    """A cache's rows by clip key, plus failed/, stale/ and attrs: what a user reads, whatever the row order."""
    with h5py.File(path, "r") as f:
        keys = list(f["video"].asstr()[:])
        size = f["size"][:] if "size" in f else [None] * len(keys)
        mtime = f["mtime_ns"][:] if "mtime_ns" in f else [None] * len(keys)
        rows = {
            k: (
                f["features"][i].tobytes(),
                f["mask"][i].tobytes(),
                int(f["label"][i]),
                f["split"].asstr()[i],
                int(f["n_frames"][i]),
                None if size[i] is None else int(size[i]),
                None if mtime[i] is None else int(mtime[i]),
            )
            for i, k in enumerate(keys)
        }
        failed = dict(zip(f["failed/video"].asstr()[:], f["failed/reason"].asstr()[:]))
        stale = dict(zip(f["stale/video"].asstr()[:], f["stale/reason"].asstr()[:])) if "stale" in f else {}
        attrs = {k: np.asarray(v).tolist() for k, v in f.attrs.items()}
    assert len(rows) == len(keys), "one row per clip"
    return {"rows": rows, "failed": failed, "stale": stale, "attrs": attrs}


def part_files(cache) -> list:
    folder = parts_dir(cache)
    return sorted(folder.iterdir()) if folder.is_dir() else []


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
import importlib
import featpipe.cache.schema as schema, featpipe.cache.shards as shards, featpipe.cache.writer as writer
where, when, nth, what = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
module, name = where.rsplit(".", 1)
original, calls = getattr(importlib.import_module(module), name), [0]
def hooked(*args, **kwargs):
    calls[0] += 1
    if when == "before" and calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    out = original(*args, **kwargs)
    if when == "after" and calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
for m in list(sys.modules.values()):  # the module that defines it and those that imported it
    if getattr(m, "__name__", "").startswith("featpipe.") and getattr(m, name, None) is original:
        setattr(m, name, hooked)
config = schema.CacheConfig.from_attrs(__import__("json").loads(sys.argv[5]))
if what == "finalize":
    writer.CacheWriter(Path(sys.argv[6]), config).finalize()
else:
    shards.merge_shards(output=Path(sys.argv[6]), force=True)
print("finished")
"""


def killed(tmp_path, hook: tuple, what: str, target: Path) -> bool:
    """Run a finalize or merge in a subprocess that SIGKILLs itself at ``hook``; True if it was killed."""
    import json

    env = {**os.environ, "FEATPIPE_ONE_FILE_MB": "0"}
    attrs = json.dumps(CONFIG.attrs())
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, *map(str, hook), what, attrs, str(target)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode in (-signal.SIGKILL, 0), proc.stderr
    return proc.returncode == -signal.SIGKILL


def stamped(rec: ClipRecord, size: int, mtime_ns: int = 1_700_000_000_000_000_000) -> ClipRecord:
    return replace(rec, size=size, mtime_ns=mtime_ns)
