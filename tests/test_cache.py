"""The HDF5 cache contract: schema, crash-safe journal, resume, refusal of mismatches, locking."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from featpipe.cache.journal import iter_journal
from featpipe.cache.lock import CacheLock
from featpipe.cache.reader import open_h5, read_config, summarize
from featpipe.cache.schema import SCHEMA_VERSION, CacheConfig, ClipRecord, journal_path
from featpipe.cache.shards import merge_shards, parse_shard, parse_shard_path, shard_of, shard_path
from featpipe.cache.writer import CacheWriter
from featpipe.cli.commands import app
from featpipe.errors import CacheError, FeatpipeError

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


def test_finalized_cache_has_the_documented_schema_and_reads_with_plain_h5py_and_pandas(tmp_path):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, CONFIG)
    for i in (2, 0, 1):  # completion order differs from key order
        w.append(clip(i))
    w.append(ClipRecord("train/b/bad.mp4", 1, "train", 0, error="no decodable frame"))
    w.finalize()
    with h5py.File(path, "r") as f:
        assert f.attrs["schema_version"] == SCHEMA_VERSION
        for key in ("backbone", "weights", "weights_fingerprint", "input_size", "frames", "sampling", "class_names"):
            assert key in f.attrs
        assert f["features"].shape == (3, T, D) and f["features"].dtype == np.float16
        assert f["features"].chunks == (1, T, D)
        assert f["mask"].dtype == bool and f["mask"].shape == (3, T)
        df = pd.DataFrame(
            {
                "video": f["video"].asstr()[:],
                "label": f["label"][:],
                "split": f["split"].asstr()[:],
                "n_frames": f["n_frames"][:],
            }
        )
        assert list(df.video) == [f"train/a/clip{i}.mp4" for i in range(3)]  # sorted by key
        assert list(df.n_frames) == [30, 31, 32]
        np.testing.assert_array_equal(f["features"][1], clip(1).features)
        assert list(f["failed/video"].asstr()[:]) == ["train/b/bad.mp4"]
        assert list(f["failed/reason"].asstr()[:]) == ["no decodable frame"]
    assert not journal_path(path).exists()


@pytest.mark.parametrize("cut_from_end", list(range(1, 60)))
def test_a_record_torn_anywhere_is_dropped_and_earlier_clips_survive(tmp_path, cut_from_end):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, CONFIG)
    for i in range(3):
        w.append(clip(i))
    w.close()
    j = journal_path(path)
    size = j.stat().st_size
    with open(j, "r+b") as fh:  # a SIGKILL in the middle of writing the third record
        fh.truncate(size - cut_from_end)
    w2 = CacheWriter(path, CONFIG)
    assert w2.done == {"train/a/clip0.mp4", "train/a/clip1.mp4"}
    w2.append(clip(2))  # the resumed run redoes the torn clip
    w2.finalize()
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["features"][2], clip(2).features)
        assert f["video"].shape == (3,)


def test_corrupted_bytes_inside_a_record_are_detected_by_the_checksum(tmp_path):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, CONFIG)
    for i in range(2):
        w.append(clip(i))
    w.close()
    j = journal_path(path)
    data = bytearray(j.read_bytes())
    data[-10] ^= 0xFF  # flip bits in the last record's payload
    j.write_bytes(bytes(data))
    assert [h["video"] for h in iter_journal(j)] == ["train/a/clip0.mp4"]


def test_resume_adds_to_an_existing_cache_and_equals_a_clean_write(tmp_path):
    first = tmp_path / "resumed.h5"
    w = CacheWriter(first, CONFIG)
    w.append(clip(0))
    w.append(clip(3))
    w.finalize()
    w = CacheWriter(first, CONFIG)
    assert w.done == {"train/a/clip0.mp4", "train/a/clip3.mp4"}
    for i in (1, 2):
        w.append(clip(i))
    w.finalize()
    clean = tmp_path / "clean.h5"
    w = CacheWriter(clean, CONFIG)
    for i in range(4):
        w.append(clip(i))
    w.finalize()
    with h5py.File(first, "r") as a, h5py.File(clean, "r") as b:
        for name in ("features", "mask", "label", "split", "video", "n_frames", "failed/video"):
            np.testing.assert_array_equal(a[name][()], b[name][()])
        assert dict(a.attrs).keys() == dict(b.attrs).keys()


def test_a_finalize_killed_before_its_rename_leaves_the_old_cache_and_resumes(tmp_path):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, CONFIG)
    w.append(clip(0))
    w.finalize()
    w = CacheWriter(path, CONFIG)
    w.append(clip(1))
    w.close()
    stale = tmp_path / "c.h5.tmp-99999"
    stale.write_bytes(b"half an hdf5 file")  # what a kill during finalize leaves behind
    w = CacheWriter(path, CONFIG)
    assert not stale.exists()
    assert w.done == {"train/a/clip0.mp4", "train/a/clip1.mp4"}
    w.finalize()
    assert summarize(path).n_clips == 2


def test_a_kill_after_the_rename_but_before_the_journal_is_removed_does_not_duplicate(tmp_path):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, CONFIG)
    w.append(clip(0))
    w.close()
    saved = journal_path(path).read_bytes()
    w = CacheWriter(path, CONFIG)
    w.finalize()
    journal_path(path).write_bytes(saved)  # the journal came back: same clip in cache and journal
    w = CacheWriter(path, CONFIG)
    w.finalize()
    assert summarize(path).n_clips == 1


def test_a_clip_that_failed_before_and_now_succeeds_leaves_failed(tmp_path):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, CONFIG)
    w.append(ClipRecord("train/a/clip0.mp4", 0, "train", 0, error="truncated"))
    w.finalize()
    w = CacheWriter(path, CONFIG)
    assert w.failed == {"train/a/clip0.mp4": "truncated"}
    w.append(clip(0))
    w.finalize()
    s = summarize(path)
    assert s.n_clips == 1 and s.failed == []


def test_assignments_from_the_current_index_update_labels_and_splits(tmp_path):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, CONFIG)
    w.append(clip(0))
    w.finalize({"train/a/clip0.mp4": (1, "val")})
    with h5py.File(path, "r") as f:
        assert f["label"][0] == 1 and f["split"].asstr()[0] == "val"


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(frames=8), "frames: 8 requested, 4 in the cache"),
        (dict(backbone="resnet50"), "backbone: resnet50 requested, vgg16 in the cache"),
        (dict(weights_fingerprint="zzz"), "weights_fingerprint"),
        (dict(input_size=64), "input_size: 64 requested, 32"),
        (dict(sampling="first"), "sampling: first requested, uniform"),
        (dict(class_names=("a", "b", "c")), "class_names"),
    ],
)
def test_extracting_into_a_cache_with_other_settings_is_refused_saying_what_differs(tmp_path, change, words):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, CONFIG)
    w.append(clip(0))
    w.finalize()
    with pytest.raises(CacheError, match=words.replace("(", r"\(")):
        CacheWriter(path, replace(CONFIG, **change))
    # an unfinished journal with other settings is refused too
    other = tmp_path / "j.h5"
    w = CacheWriter(other, CONFIG)
    w.append(clip(0))
    w.close()
    with pytest.raises(CacheError, match="unfinished extraction"):
        CacheWriter(other, replace(CONFIG, **change))


def test_a_fingerprint_settled_later_is_checked_as_opening_checks_it_and_nothing_is_written_before(tmp_path):
    """--engine ray opens the writer while the driver's fingerprint is still being computed."""
    path, journaled = tmp_path / "c.h5", tmp_path / "j.h5"
    for target in (path, journaled):
        w = CacheWriter(target, CONFIG)
        w.append(clip(0))
        w.close()
    CacheWriter(path, CONFIG).finalize()  # path: a finished cache; journaled: an unfinished journal
    unknown = replace(CONFIG, weights_fingerprint=None)
    for target, what in ((path, "existing cache"), (journaled, "unfinished extraction")):
        with pytest.raises(CacheError) as opened:
            CacheWriter(target, replace(CONFIG, weights_fingerprint="zzz"))
        w = CacheWriter(target, unknown)  # every other setting is the same: opens
        with pytest.raises(RuntimeError, match="settle_fingerprint"):
            w.append(clip(1))
        with pytest.raises(CacheError, match=what) as settled:
            w.settle_fingerprint("zzz")
        assert str(settled.value) == str(opened.value), "the sentence opening says"
    with pytest.raises(CacheError, match="frames: 8 requested, 4 in the cache"):  # the rest is checked at once
        CacheWriter(path, replace(unknown, frames=8))
    w = CacheWriter(path, unknown)
    w.settle_fingerprint(CONFIG.weights_fingerprint)
    w.append(clip(1))
    w.finalize()
    assert read_all(path)["video"].tolist() == [b"train/a/clip0.mp4", b"train/a/clip1.mp4"]


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    path = tmp_path / "c.h5"
    with CacheLock(path):
        with pytest.raises(CacheError, match="Another featpipe extraction is writing"):
            with CacheLock(path):
                pass
    with CacheLock(path):  # released on exit
        pass


def test_the_lock_is_released_when_its_process_is_killed(tmp_path):
    path = tmp_path / "c.h5"
    code = (
        "import sys, time; from pathlib import Path; from featpipe.cache.lock import CacheLock;"
        f"l = CacheLock(Path({str(path)!r})).__enter__(); print('locked', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(CacheError):
            with CacheLock(path):
                pass
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        with CacheLock(path):
            pass
    finally:
        proc.kill()
        proc.wait()


def test_missing_cache_is_one_sentence(tmp_path):
    with pytest.raises(CacheError, match="does not exist.*featpipe extract"):
        open_h5(tmp_path / "none.h5")


def test_truncated_cache_is_one_sentence(tmp_path):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, CONFIG)
    w.append(clip(0))
    w.finalize()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CacheError, match="not a readable HDF5 file"):
        read_config(path)


def test_foreign_hdf5_and_other_schema_versions_are_refused(tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(CacheError, match="not a featpipe cache"):
        read_config(foreign)
    future = tmp_path / "future.h5"
    with h5py.File(future, "w") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(CacheError, match=f"schema version {SCHEMA_VERSION + 1}"):
        read_config(future)


def test_summary_counts_clips_per_split_and_class_and_lists_failures(tmp_path):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, CONFIG)
    for i in range(3):
        w.append(clip(i))
    w.append(ClipRecord("x.mp4", 0, "test", 0, error="zero-byte file"))
    w.finalize({"train/a/clip2.mp4": (1, "test")})
    s = summarize(path)
    assert s.counts == {"train": {"a": 1, "b": 1}, "test": {"b": 1}}
    assert s.real_frames == 9
    text = "\n".join(s.lines())
    assert "x.mp4: zero-byte file" in text and "3 clips" in text


# ----------------------------------------------------------------------------- shards and merge

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


def test_shard_assignment_is_a_partition_fixed_by_each_clip_key_alone():
    for n in (1, 2, 3, 7):
        members = {i: {k for k in KEYS if shard_of(k, n) == i} for i in range(1, n + 1)}
        assert set().union(*members.values()) == set(KEYS), "every clip is in some shard"
        assert sum(len(m) for m in members.values()) == len(KEYS), "no clip is in two shards"
    # from a SHA-1 of the key alone: the same on every machine and in every process (no hash seed)
    assert [shard_of(k, 4) for k in ("train/a/clip 0.mp4", "val/b/clip 5.mp4", "gööd β.mp4")] == [3, 2, 1]
    assert shard_path(Path("cache/vgg16.h5"), 2, 4) == Path("cache/vgg16.shard-2-of-4.h5")
    assert parse_shard_path(Path("cache/vgg16.shard-2-of-4.h5")) == (Path("cache/vgg16.h5"), 2, 4)
    assert parse_shard_path(Path("cache/vgg16.h5")) is None


@pytest.mark.parametrize("spec", ["0/4", "5/4", "2", "a/b", "2/0", "-1/4", ""])
def test_a_bad_shard_spec_is_one_sentence(spec):
    with pytest.raises(FeatpipeError, match="--shard must look like I/N with 1 <= I <= N, e.g. 2/4"):
        parse_shard(spec)
    assert parse_shard("2/4") == (2, 4) and parse_shard("1/1") == (1, 1)


def test_merged_shards_equal_the_cache_one_unsharded_run_writes(tmp_path):
    whole = tmp_path / "whole.h5"
    write_clips(whole, KEYS, failed=("train/a/broken.mp4", "val/b/broken.mp4"))
    out = tmp_path / "c.h5"
    shards = write_shards(out, 3)
    assert merge_shards(output=out) == out  # finds c.shard-*-of-3.h5 beside c.h5
    x, y = read_all(out), read_all(whole)
    for name in DATASETS:
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)
    assert x["attrs"] == y["attrs"], "same attributes; the informational shard attribute is dropped"
    assert list(x["video"].astype(str)) == sorted(KEYS)
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name) == []
    assert all(p.exists() for p in shards), "the shards are kept"
    # naming the shards explicitly gives the same file
    again = tmp_path / "elsewhere" / "merged.h5"
    merge_shards([str(p) for p in reversed(shards)], again)
    for name in DATASETS:
        np.testing.assert_array_equal(read_all(again)[name], y[name], err_msg=name)


def test_a_shard_with_no_clip_merges_fine_and_a_clip_in_two_shards_with_equal_contents_counts_once(tmp_path):
    out = tmp_path / "c.h5"
    keys = KEYS[:4]
    first = shard_path(out, 1, 2)
    write_clips(first, keys, replace(CONFIG, extra={"shard": "1/2"}))  # every clip, as if all hashed to 1
    write_clips(shard_path(out, 2, 2), keys[:1], replace(CONFIG, extra={"shard": "2/2"}))  # and one again
    merge_shards(output=out)
    assert list(read_all(out)["video"].astype(str)) == sorted(keys)
    empty = tmp_path / "e.h5"
    write_clips(shard_path(empty, 1, 2), keys, replace(CONFIG, extra={"shard": "1/2"}))
    write_clips(shard_path(empty, 2, 2), [], replace(CONFIG, extra={"shard": "2/2"}))
    assert summarize(shard_path(empty, 2, 2)).n_clips == 0
    merge_shards(output=empty)
    assert summarize(empty).n_clips == 4


runner = CliRunner()


def merge_cli(*args):
    result = runner.invoke(app, ["merge", *map(str, args)])
    assert "Traceback" not in result.output
    return result


def refused(result, *words) -> str:
    """Exit 2 and one sentence on stderr that contains every one of ``words``."""
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.startswith("error: ") and len(message.splitlines()) == 1, message
    for word in words:
        assert word in message, (word, message)
    return message


def test_merge_cli_prints_the_merged_cache_and_refuses_to_overwrite_it_without_force(tmp_path):
    out = tmp_path / "c.h5"
    write_shards(out, 2)
    result = merge_cli("--output", out)
    assert result.exit_code == 0, result.output
    assert f"Merged 2 shards into {out}" in result.stdout and f"{len(KEYS)} clips" in result.stdout
    before = out.stat().st_mtime_ns
    refused(merge_cli("--output", out), f"'{out}' already exists", "--force")
    assert out.stat().st_mtime_ns == before
    assert merge_cli("--output", out, "--force").exit_code == 0


def test_merge_refuses_shards_made_with_other_settings_naming_both_files_and_the_difference(tmp_path):
    out = tmp_path / "c.h5"
    write_shards(out, 2)
    second = shard_path(out, 2, 2)
    second.unlink()
    write_clips(
        second,
        [k for k in KEYS if shard_of(k, 2) == 2],
        replace(CONFIG, weights_fingerprint="zzz", extra={"shard": "2/2"}),
    )
    refused(
        merge_cli("--output", out),
        str(shard_path(out, 1, 2)),
        str(second),
        "weights_fingerprint: abc123 in shard 1/2, zzz in shard 2/2",
    )
    assert not out.exists()


def test_merge_refuses_a_missing_shard_naming_the_file_to_extract(tmp_path):
    out = tmp_path / "c.h5"
    shards = write_shards(out, 3)
    shards[1].unlink()
    refused(merge_cli("--output", out), "Shard 2/3 is missing", str(shards[1]), "featpipe extract --shard 2/3")
    refused(merge_cli("--output", out, shards[0], shards[2]), "Shard 2/3 is missing")
    write_shards(out, 3)
    refused(merge_cli("--output", out, shards[0], shards[2]), "missing from the shards given", str(shards[1]))
    assert not out.exists()


def test_merge_refuses_shards_of_different_sets(tmp_path):
    out = tmp_path / "c.h5"
    write_shards(out, 3)
    write_shards(out, 2)  # an older 2-way set of the same cache left beside it
    refused(merge_cli("--output", out), "different sets", "shard 1/2", "1/3")
    assert merge_cli("--output", out, *[shard_path(out, i, 3) for i in (1, 2, 3)]).exit_code == 0


def test_merge_refuses_an_unfinished_or_running_shard(tmp_path):
    out = tmp_path / "c.h5"
    shards = write_shards(out, 2)
    w = CacheWriter(shards[0], replace(CONFIG, extra={"shard": "1/2"}))
    w.append(clip(99, "train/a/late.mp4"))  # a second run of shard 1 killed before it finished
    w.close()
    refused(merge_cli("--output", out), "unfinished extraction", str(shards[0]), "featpipe extract --shard 1/2")
    with CacheLock(shards[0]):  # ... or still running
        refused(merge_cli("--output", out), str(shards[0]), "being written by a running extraction")
    journal_path(shards[0]).rename(journal_path(shards[1]))
    shards[1].unlink()  # shard 2's first run: nothing but its journal yet
    refused(merge_cli("--output", out), "unfinished extraction", str(shards[1]))
    assert not out.exists()


def test_merge_refuses_one_clip_with_different_contents_in_two_shards(tmp_path):
    out = tmp_path / "c.h5"
    write_clips(shard_path(out, 1, 2), ["train/a/clip 0.mp4"], replace(CONFIG, extra={"shard": "1/2"}))
    w = CacheWriter(shard_path(out, 2, 2), replace(CONFIG, extra={"shard": "2/2"}))
    w.append(clip(7, "train/a/clip 0.mp4"))  # same key, other features
    w.finalize()
    refused(merge_cli("--output", out), "'train/a/clip 0.mp4' is in both", str(shard_path(out, 2, 2)))
    assert not out.exists() and not list(tmp_path.glob("*.tmp-*"))


def test_merge_refuses_a_whole_cache_and_no_shards_at_all(tmp_path):
    whole = tmp_path / "whole.h5"
    write_clips(whole, KEYS[:2])
    refused(merge_cli("--output", tmp_path / "m.h5", whole), "not a shard")
    refused(merge_cli("--output", tmp_path / "none.h5"), "No shards of", "none.shard-I-of-N.h5", "--shard I/N")


# ----------------------------------------------------------------------------- clip identity, stale rows, schema 2

from featpipe.errors import CannotWrite  # noqa: E402
from mounts import fill, read_only, tmpfs  # noqa: E402

IDENT = {f"train/a/clip{i}.mp4": (1000 + i, 5_000_000_000 + i) for i in range(4)}


def identified(i: int, key: str | None = None) -> ClipRecord:
    rec = clip(i, key)
    return replace(rec, size=IDENT.get(rec.video, (1, 1))[0], mtime_ns=IDENT.get(rec.video, (1, 1))[1])


def test_rows_record_their_clip_identity_and_rows_whose_clip_left_the_dataset_are_dropped_to_stale(tmp_path):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, CONFIG)
    for i in range(4):
        w.append(identified(i))
    w.append(replace(ClipRecord("train/b/bad.mp4", 1, "train", 0, error="zero-byte file"), size=0, mtime_ns=7))
    w.finalize()
    with h5py.File(path, "r") as f:
        assert f.attrs["schema_version"] == SCHEMA_VERSION == 3
        assert [tuple(x) for x in zip(f["size"][:], f["mtime_ns"][:])] == [IDENT[k] for k in sorted(IDENT)]
        assert (f["failed/size"][0], f["failed/mtime_ns"][0]) == (0, 7)
    w = CacheWriter(path, CONFIG)
    assert w.identity("train/a/clip2.mp4") == IDENT["train/a/clip2.mp4"]
    current = {k: v for k, v in IDENT.items() if k != "train/a/clip3.mp4"}  # clip3 deleted, clip1 changed
    current["train/a/clip1.mp4"] = (999, 1)
    w.finalize(current=current)
    assert (w.n_dropped, w.n_changed) == (1, 1)
    with h5py.File(path, "r") as f:
        assert list(f["video"].asstr()[:]) == ["train/a/clip0.mp4", "train/a/clip2.mp4"]
        assert dict(zip(f["stale/video"].asstr()[:], f["stale/reason"].asstr()[:])) == {
            "train/a/clip1.mp4": "its file changed after it was extracted",
            "train/a/clip3.mp4": "no longer in the dataset",
        }
        assert list(f["failed/video"].asstr()[:]) == [], "a failed clip that left the dataset is forgotten"
    assert summarize(path).n_clips == 2 and [k for k, _ in summarize(path).stale] == [
        "train/a/clip1.mp4",
        "train/a/clip3.mp4",
    ]


def _downgrade_to_version_1(path) -> None:
    with h5py.File(path, "a") as f:
        for name in ("size", "mtime_ns", "failed/size", "failed/mtime_ns", "stale"):
            del f[name]
        f.attrs["schema_version"] = 1


def test_a_version_1_cache_is_read_and_resumed_trusting_its_rows_and_recording_their_identity_from_then_on(tmp_path):
    from featpipe.training.inputs import open_index

    path = tmp_path / "c.h5"
    w = CacheWriter(path, CONFIG)
    for i in range(3):
        w.append(clip(i))
    w.finalize()
    _downgrade_to_version_1(path)
    assert read_config(path) == CONFIG and summarize(path).n_clips == 3 and open_index(path) is not None
    w = CacheWriter(path, CONFIG)
    assert w.done == set(list(IDENT)[:3]) and w.identity("train/a/clip0.mp4") is None
    w.append(identified(3))
    w.finalize(current=IDENT)
    with h5py.File(path, "r") as f:
        assert f.attrs["schema_version"] == SCHEMA_VERSION
        assert [tuple(x) for x in zip(f["size"][:], f["mtime_ns"][:])] == [IDENT[k] for k in sorted(IDENT)]


def test_merge_carries_identity_and_stale_rows_and_accepts_a_version_1_shard(tmp_path):
    out = tmp_path / "c.h5"
    for i in (1, 2):
        w = CacheWriter(shard_path(out, i, 2), replace(CONFIG, extra={"shard": f"{i}/2"}))
        for key in (k for k in IDENT if shard_of(k, 2) == i):
            w.append(identified(int(key[-5]), key))
        w.finalize(current={k: v for k, v in IDENT.items() if shard_of(k, 2) == i} | {"gone.mp4": None})
    _downgrade_to_version_1(shard_path(out, 2, 2))
    merge_shards(output=out)
    with h5py.File(out, "r") as f:
        keys = list(f["video"].asstr()[:])
        assert keys == sorted(IDENT) and f.attrs["schema_version"] == SCHEMA_VERSION
        got = {k: (int(s), int(m)) for k, s, m in zip(keys, f["size"][:], f["mtime_ns"][:])}
    assert all(got[k] == IDENT[k] for k in IDENT if shard_of(k, 2) == 1)
    assert all(got[k] == (-1, -1) for k in IDENT if shard_of(k, 2) == 2), "version 1 rows: identity unknown"


def test_merge_output_naming_a_folder_is_one_sentence_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "c.h5"
    shards = write_shards(out, 2)
    folder = tmp_path / "merged"
    folder.mkdir()
    refused(merge_cli("--output", folder, "--force", *shards), f"'{folder}' is a folder")
    assert not list(tmp_path.glob("*.tmp-*")) and list(folder.iterdir()) == []


def test_merge_of_a_shard_named_twice_counts_it_once(tmp_path):
    out = tmp_path / "c.h5"
    shards = write_shards(out, 2)
    result = merge_cli("--output", out, shards[0], shards[0], shards[1])
    assert result.exit_code == 0, result.output
    assert "Merged 2 shards" in result.stdout and "Merged 3" not in result.stdout


def test_a_cache_open_in_another_hdf5_writer_is_not_called_truncated(tmp_path):
    path = tmp_path / "c.h5"
    write_clips(path, KEYS[:2])
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import h5py, sys, time; f = h5py.File(sys.argv[1], 'a'); print('open', flush=True); time.sleep(60)",
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(CacheError) as info:
            open_h5(path)
    finally:
        holder.kill()
        holder.wait()
    assert "open for writing in another program" in str(info.value)
    assert "truncated" not in str(info.value) and "featpipe extract" not in str(info.value)


def test_a_truncated_cache_says_to_restore_or_move_it_not_to_rerun_extract_alone(tmp_path):
    path = tmp_path / "c.h5"
    write_clips(path, KEYS[:2])
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CacheError, match="restore it from a backup, or move it away") as info:
        CacheWriter(path, CONFIG)
    assert "Re-run `featpipe extract`" not in str(info.value)


def test_a_full_disk_while_journaling_or_writing_the_cache_is_one_sentence_and_keeps_cache_and_journal(tmp_path):
    with tmpfs(tmp_path / "disk", "1m") as disk:
        path = disk / "c.h5"
        w = CacheWriter(path, CONFIG)
        w.append(clip(0))
        w.finalize()
        old = path.read_bytes()
        big = replace(CONFIG, feature_shape=(4096,))  # 32 KiB a record: the disk fills in a few
        path.unlink()
        filler = fill(disk, leave=100_000)
        w = CacheWriter(path, big)
        with pytest.raises(
            CacheError,
            match=r"The disk holding .* is full; free some space and run the same command "
            r"again \(the clips finished so far are kept\)",
        ) as info:
            for i in range(100):
                w.append(ClipRecord(f"k{i:03d}.mp4", 0, "train", 4, np.ones((T, 4096), np.float16), np.ones(T, bool)))
        assert info.value.exit_code == 1
        w.close()
        kept = len(list(iter_journal(journal_path(path))))
        assert kept >= 1
        with pytest.raises(CacheError, match="is full") as info:  # no room for the HDF5 file either
            w.finalize()
        assert info.value.exit_code == 1
        assert not list(disk.glob("*.tmp-*")) and len(list(iter_journal(journal_path(path)))) == kept
        filler.unlink()
        CacheWriter(path, big).finalize()  # space freed: the same command finishes
        assert summarize(path).n_clips == kept and not journal_path(path).exists()
        path.unlink()
        path.write_bytes(old)  # and a full disk never touches an existing cache
        w = CacheWriter(path, CONFIG)
        w.append(clip(1))
        w.close()
        filler = fill(disk, leave=0)
        with pytest.raises(CacheError, match="is full"):
            w.finalize()
        assert path.read_bytes() == old and len(list(iter_journal(journal_path(path)))) == 1
        assert not list(disk.glob("*.tmp-*"))
        filler.unlink()


_FULL_WHILE_WRITING = """
import os, sys
from pathlib import Path
import numpy as np
from featpipe.cache.schema import CacheConfig, ClipRecord
from featpipe.cache.writer import CacheWriter
from featpipe.errors import CacheError
disk, leave = Path(sys.argv[1]), int(sys.argv[2])
config = CacheConfig("vgg16", "none", "fp", 32, 4, "uniform", "float32", (512,), ("a", "b"))
w = CacheWriter(disk / "c.h5", config)
for i in range(6):
    w.append(ClipRecord(f"v{i}.mp4", i % 2, "train", 4, np.ones((4, 512), np.float32), np.ones(4, bool)))
w.close()
st = os.statvfs(disk)
with open(disk / "filler", "wb") as fh:  # leave `leave` bytes: the journal is written, the HDF5 file is not
    fh.write(bytes(max(st.f_bavail * st.f_frsize - leave, 0)))
try:
    w.finalize()
except CacheError as exc:
    print(exc, exc.exit_code)
del w
"""


@pytest.mark.parametrize("layout", ["one file", "part files"])
def test_a_full_disk_inside_the_hdf5_write_is_the_sentence_and_no_crash_on_the_way_out(tmp_path, layout):
    """A full disk met by HDF5 itself while writing the final cache left handles it could not close: the
    sentence was printed, then the process died of a segmentation fault (status 139) freeing them. Caches
    over the one-file limit write a part file and an index file: the same holds for both."""
    env = {**os.environ, "FEATPIPE_ONE_FILE_MB": "64" if layout == "one file" else "0"}
    for leave in (8192, 24576, 40960):  # the disk fills in the HDF5 file's data, its metadata, at its close
        with tmpfs(tmp_path / "disk", "1m") as disk:
            done = subprocess.run(
                [sys.executable, "-c", _FULL_WHILE_WRITING, str(disk), str(leave)],
                text=True,
                capture_output=True,
                env=env,
            )
            assert done.returncode == 0, f"left {leave} bytes: status {done.returncode}\n{done.stderr[-2000:]}"
            assert "is full; free some space and run the same command again" in done.stdout and " 1\n" in done.stdout
            assert "Exception ignored" not in done.stderr
            assert (disk / "c.h5.journal").is_file() and not (disk / "c.h5").exists()  # nothing finished lost
            assert not list(disk.glob("*.tmp-*"))
            assert not [p for p in disk.rglob("*.h5") if p.parent.name.endswith(".parts")]  # no stray part
            (disk / "filler").unlink()  # space freed: the same command finishes from the journal
            CacheWriter(
                disk / "c.h5", CacheConfig("vgg16", "none", "fp", 32, 4, "uniform", "float32", (512,), ("a", "b"))
            ).finalize()
            assert summarize(disk / "c.h5").n_clips == 6


def test_a_read_only_folder_is_one_sentence_for_a_new_cache_and_for_merge(tmp_path):
    with tmpfs(tmp_path / "media", "4m") as media:
        out = media / "c.h5"
        shards = write_shards(out, 2)
        with read_only(media):
            with pytest.raises(CannotWrite, match=f"Cannot write to '{media}'"):
                with CacheLock(media / "new.h5"):
                    pass
            refused(merge_cli("--output", out), f"Cannot write to '{media}'", "--output")
            elsewhere = tmp_path / "merged.h5"  # shards on read-only media merge into a writable folder
            assert merge_cli("--output", elsewhere, *shards).exit_code == 0
        assert not out.exists() and not list(media.glob("*.tmp-*")) and shards[0].exists()


# ----------------------------------------------------------------------------- part files (schema 3)

from featpipe.cache.schema import parts_dir  # noqa: E402
from featpipe.cache.shards import compact_cache  # noqa: E402
from featpipe.cache.verify import has_checksums  # noqa: E402


@pytest.fixture(autouse=True)
def default_threshold(monkeypatch):
    """Tests see featpipe's default 64 MB threshold whatever the shell sets."""
    monkeypatch.delenv("FEATPIPE_ONE_FILE_MB", raising=False)


@pytest.fixture
def parted(monkeypatch):
    """Every cache with at least one clip is written in part files (as caches over 64 MB are)."""
    monkeypatch.setenv("FEATPIPE_ONE_FILE_MB", "0")


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


def test_a_large_cache_keeps_features_in_part_files_read_by_plain_h5py_and_pandas_and_adding_clips_writes_only_them(
    tmp_path, parted
):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, CONFIG)
    for i in (2, 0, 1):
        w.append(clip(i))
    w.append(ClipRecord("train/b/bad.mp4", 1, "train", 0, error="no decodable frame"))
    w.finalize()
    (first,) = part_files(path)
    before = (first.stat().st_ino, first.stat().st_mtime_ns, first.read_bytes())
    for i in (4, 3):  # the same writer goes on (as after a Ctrl-C inside one process)
        w.append(clip(i))
    w.finalize()
    assert len(part_files(path)) == 2, "the new clips went into one new part file"
    after = (first.stat().st_ino, first.stat().st_mtime_ns, first.read_bytes())
    assert after == before, "old parts are never rewritten"
    with h5py.File(path, "r") as f:  # the README's example, unchanged
        clips = pd.DataFrame(
            {
                "video": f["video"].asstr()[:],
                "split": f["split"].asstr()[:],
                "label": f["label"][:],
                "n_frames": f["n_frames"][:],
            }
        )
        classes = list(f.attrs["class_names"])
        x, mask = f["features"][:8], f["mask"][:8]
        assert f["features"].is_virtual and f.attrs["schema_version"] == SCHEMA_VERSION
    assert sorted(clips["video"]) == [f"train/a/clip{i}.mp4" for i in range(5)] and classes == ["a", "b"]
    assert x.shape == (5, T, D) and x.dtype == np.float16 and mask.shape == (5, T)
    for i, key in enumerate(clips["video"]):  # each row holds its own clip's features
        n = int(key[-5])
        np.testing.assert_array_equal(x[i], clip(n).features)
        assert clips["n_frames"][i] == 30 + n
    for part in part_files(path):
        with h5py.File(part, "r") as p:
            assert p["features"].fletcher32 and p["features"].chunks == (1, T, D)
    with h5py.File(path, "r") as f:
        assert has_checksums(f, path), "the virtual dataset has no filter of its own: its parts are asked"
    clean = tmp_path / "clean.h5"
    w = CacheWriter(clean, CONFIG)
    for i in range(5):
        w.append(clip(i))
    w.append(ClipRecord("train/b/bad.mp4", 1, "train", 0, error="no decodable frame"))
    w.finalize()
    assert by_key(path) == by_key(clean)
    assert any("2 part file(s)" in line for line in summarize(path).lines())


def test_rows_dropped_from_part_files_go_to_stale_and_a_part_no_row_uses_is_removed(tmp_path, parted):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, CONFIG)
    for i in range(2):
        w.append(identified(i))
    w.finalize()
    w = CacheWriter(path, CONFIG)
    for i in range(2, 4):
        w.append(identified(i))
    w.finalize()
    old_parts = part_files(path)
    current = {k: v for k, v in IDENT.items() if k not in ("train/a/clip0.mp4", "train/a/clip1.mp4")}
    current["train/a/clip2.mp4"] = (999, 1)  # changed, not re-extracted
    w = CacheWriter(path, CONFIG)
    w.finalize(current=current)
    assert (w.n_dropped, w.n_changed) == (2, 1)
    f = by_key(path)
    assert list(f["rows"]) == ["train/a/clip3.mp4"]
    assert f["stale"] == {
        "train/a/clip0.mp4": "no longer in the dataset",
        "train/a/clip1.mp4": "no longer in the dataset",
        "train/a/clip2.mp4": "its file changed after it was extracted",
    }
    assert len(part_files(path)) == 1 and part_files(path)[0] in old_parts, "the part only dropped rows used is gone"
    np.testing.assert_array_equal(
        np.frombuffer(f["rows"]["train/a/clip3.mp4"][0], np.float16).reshape(T, D), clip(3).features
    )


def test_a_version_2_one_file_cache_grows_into_parts_without_copying_its_features_and_still_trains(
    tmp_path, monkeypatch
):
    from featpipe.training.inputs import feature_stats, load_rows, open_index

    path = tmp_path / "c.h5"
    w = CacheWriter(path, CONFIG)
    for i in range(4):
        w.append(identified(i))
    w.finalize()  # small: one file
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = 2  # as featpipe wrote it before part files existed
    assert not parts_dir(path).exists()
    inode = path.stat().st_ino
    monkeypatch.setenv("FEATPIPE_ONE_FILE_MB", "0")
    w = CacheWriter(path, CONFIG)
    assert w.done == set(IDENT)
    w.append(identified(4))
    w.finalize()
    assert inode in {p.stat().st_ino for p in part_files(path)}, "the old file became a part (hard link), not a copy"
    index = open_index(path)
    assert sorted(index.videos) == sorted([*IDENT, "train/a/clip4.mp4"])
    rows = np.arange(len(index.videos))
    inputs, _ = load_rows(index, rows)  # what train reads, in memory ...
    mean, _ = feature_stats(index, rows, check=rows)  # ... and streaming (NaN check included)
    expected = np.stack([clip(int(v[-5])).features for v in index.videos]).astype(np.float32)
    np.testing.assert_array_equal(inputs["features"], expected)
    np.testing.assert_allclose(mean, expected[index.mask].mean(axis=0), rtol=1e-5)
    with h5py.File(path, "r") as f:
        for i, key in enumerate(f["video"].asstr()[:]):
            np.testing.assert_array_equal(f["features"][i], clip(int(key[-5])).features)


def test_a_cache_copied_without_its_parts_folder_is_one_sentence_and_merge_compact_writes_one_file(
    tmp_path, parted, monkeypatch
):
    path = tmp_path / "c.h5"
    write_clips(path, KEYS[:6], failed=["train/a/broken.mp4"])
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / "c.h5").write_bytes(path.read_bytes())
    with pytest.raises(CacheError, match=r"keeps its features in part files.*c\.h5\.parts.*is missing.*--compact"):
        open_h5(moved / "c.h5")
    with h5py.File(moved / "c.h5", "r") as f:  # plain h5py cannot refuse: it reads NaN, never plausible zeros
        assert np.isnan(f["features"][0]).all()
    result = merge_cli("--compact", "--output", str(tmp_path / "one.h5"), str(path))
    assert result.exit_code == 0, result.output
    assert "Compacted" in result.output
    assert not parts_dir(tmp_path / "one.h5").exists()
    (moved / "one.h5").write_bytes((tmp_path / "one.h5").read_bytes())  # one file: copy it alone
    monkeypatch.delenv("FEATPIPE_ONE_FILE_MB")
    clean = tmp_path / "clean.h5"
    write_clips(clean, KEYS[:6], failed=["train/a/broken.mp4"])
    x, y = read_all(moved / "one.h5"), read_all(clean)
    for name in DATASETS:  # exactly the one-file cache, rows sorted by key
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)
    compact_cache(path)  # in place: the parts go
    assert not parts_dir(path).exists() and by_key(path) == by_key(clean)


def test_merging_large_shards_links_their_parts_and_survives_deleting_the_shards(tmp_path, parted):
    import shutil

    out, whole = tmp_path / "c.h5", tmp_path / "whole.h5"
    write_clips(whole, KEYS, failed=["train/a/broken.mp4", "val/b/broken.mp4"])
    shards = write_shards(out, 3)
    shard_parts = {p.stat().st_ino for s in shards for p in part_files(s)}
    assert merge_shards(output=out) == out
    assert {p.stat().st_ino for p in part_files(out)} == shard_parts, "hard links, no copies"
    expected = by_key(whole)
    assert by_key(out) == expected
    for s in shards:
        s.unlink()
        shutil.rmtree(parts_dir(s))
    assert by_key(out) == expected, "the merged cache does not need the shards"


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


FINALIZE_KILLS = [
    ("featpipe.cache.parts.write_part", "after", 1),
    ("featpipe.cache.parts._link_part", "after", 1),
    ("featpipe.cache.parts.write_parted_temporary", "after", 1),
    ("featpipe.runtime.atomic.replace", "after", 1),
    ("featpipe.cache.parts.collect_parts", "before", 2),
]


@pytest.mark.parametrize("hook", FINALIZE_KILLS, ids=["-".join(map(str, h)) for h in FINALIZE_KILLS])
def test_a_finalize_killed_anywhere_resumes_to_the_cache_a_clean_run_writes(tmp_path, parted, hook):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, CONFIG)
    for i in range(3):
        w.append(clip(i))
    w.finalize()
    w = CacheWriter(path, CONFIG)
    for i in (3, 4):
        w.append(clip(i))
    w.append(clip(9, "train/a/clip1.mp4"))  # re-extracted: replaces an old row
    w.append(ClipRecord("train/b/bad.mp4", 1, "train", 0, error="no decodable frame"))
    w.close()
    assert killed(tmp_path, hook, "finalize", path)
    seen = set(by_key(path)["rows"])  # a reader sees the old cache or the new one, never a mix or a torn file
    assert seen in ({f"train/a/clip{i}.mp4" for i in range(3)}, {f"train/a/clip{i}.mp4" for i in range(5)})
    CacheWriter(path, CONFIG).finalize()  # the same command again
    clean = tmp_path / "clean.h5"
    w = CacheWriter(clean, CONFIG)
    for i in (0, 2, 3, 4):
        w.append(clip(i))
    w.append(clip(9, "train/a/clip1.mp4"))
    w.append(ClipRecord("train/b/bad.mp4", 1, "train", 0, error="no decodable frame"))
    w.finalize()
    assert by_key(path) == by_key(clean)
    assert not journal_path(path).exists() and not list(tmp_path.glob("c.h5.tmp-*"))
    with h5py.File(path, "r") as f:  # no orphan part file is left behind
        assert {Path(n).name for n in f["parts/file"].asstr()[:]} == {p.name for p in part_files(path)}


MERGE_KILLS = [
    ("featpipe.cache.parts._link_part", "after", 1),
    ("featpipe.cache.parts._link_part", "after", 3),
    ("featpipe.runtime.atomic.replace", "before", 1),
    ("featpipe.cache.parts.collect_parts", "before", 2),
]


@pytest.mark.parametrize("hook", MERGE_KILLS, ids=["-".join(map(str, h)) for h in MERGE_KILLS])
def test_a_merge_killed_anywhere_leaves_no_half_cache_and_a_rerun_equals_a_clean_merge(tmp_path, parted, hook):
    out, whole = tmp_path / "c.h5", tmp_path / "whole.h5"
    write_clips(whole, KEYS, failed=["train/a/broken.mp4", "val/b/broken.mp4"])
    shards = write_shards(out, 3)
    assert killed(tmp_path, hook, "merge", out)
    if out.exists():  # killed after the rename: already complete
        assert by_key(out) == by_key(whole)
    merge_shards(output=out, force=True)
    assert by_key(out) == by_key(whole)
    assert not list(tmp_path.glob("c.h5.tmp-*"))
    with h5py.File(out, "r") as f:
        assert {Path(n).name for n in f["parts/file"].asstr()[:]} == {p.name for p in part_files(out)}
    assert all(s.is_file() for s in shards)


def test_the_cache_benchmark_runs_and_reports_adding_merging_and_rewriting(tmp_path, capsys):
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("cache_bench", Path(__file__).parents[1] / "bench" / "cache_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert (
        bench.main(
            [
                "--sizes",
                "24",
                "--shards",
                "3",
                "--command-sizes",
                "--dir",
                str(tmp_path),
                "--json",
                str(tmp_path / "b.json"),
            ]
        )
        == 0
    )
    (r,) = json.loads((tmp_path / "b.json").read_text())["results"]
    assert r["clips"] == 24 and all(r[k] > 0 for k in ("add_1_s", "add_10_s", "merge_3_s", "rewrite_s"))
    assert "| 24 |" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == [tmp_path / "b.json"], "the scratch folder is removed"
    assert "FEATPIPE_ONE_FILE_MB" not in os.environ, "the benchmark leaves the environment as it found it"


@pytest.mark.slow
def test_the_cache_benchmark_times_the_whole_extract_command_adding_clips_against_the_stat_floor(tmp_path, capsys):
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("cache_bench", Path(__file__).parents[1] / "bench" / "cache_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "b.json"
    assert (
        bench.main(
            ["--sizes", "--command-sizes", "3", "9", "--repeat", "1", "--dir", str(tmp_path), "--json", str(out)]
        )
        == 0
    )
    small, large = json.loads(out.read_text())["command"]["sizes"]
    assert (small["clips"], large["clips"]) == (3, 9) and small["ratio"] == 1.0
    assert large["ratio"] == large["median_s"] / small["median_s"] and large["median_cpu_s"] > 0
    assert "us_per_existing_clip" in large and small["stat_us_per_clip"] > 0
    assert "| 9 |" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == [out], "the scratch folder is removed"


def test_a_damaged_byte_in_a_part_file_fails_its_checksum_when_the_row_is_read(tmp_path, parted):
    path = tmp_path / "c.h5"
    write_clips(path, KEYS[:4])
    (part,) = part_files(path)
    raw = bytearray(part.read_bytes())
    target = clip(KEYS.index(KEYS[2])).features[0].tobytes()
    at = raw.find(target)
    assert at > 0
    raw[at + 1] ^= 0x40
    part.write_bytes(bytes(raw))
    with h5py.File(path, "r") as f:
        row = list(f["video"].asstr()[:]).index(KEYS[2])
        np.testing.assert_array_equal(f["features"][row - 1 if row else row + 1].shape, (T, D))  # others read fine
        with pytest.raises(OSError, match="filter"):
            f["features"][row]


def test_shards_on_another_file_system_are_copied_into_the_merged_parts(tmp_path, parted, monkeypatch):
    import errno

    out, whole = tmp_path / "c.h5", tmp_path / "whole.h5"
    write_clips(whole, KEYS, failed=["train/a/broken.mp4", "val/b/broken.mp4"])
    shards = write_shards(out, 2)

    def cross_device(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    merge_shards(output=out)
    shard_parts = {p.stat().st_ino for s in shards for p in part_files(s)}
    assert len(part_files(out)) == 2 and not {p.stat().st_ino for p in part_files(out)} & shard_parts
    assert by_key(out) == by_key(whole)


# ----------------------------------------------------------------------------- adding clips to a large cache


def stamped(rec: ClipRecord, size: int, mtime_ns: int = 1_700_000_000_000_000_000) -> ClipRecord:
    return replace(rec, size=size, mtime_ns=mtime_ns)


def test_standing_is_what_the_cache_and_journal_recorded_with_the_identity_each_clip_has_now(tmp_path):
    """The rows and failures a run reuses: recorded with the size and mtime the file has now (or with none,
    as a version 1 cache), the journal's record winning over the cache's; nothing outside ``current``."""
    path = tmp_path / "c.h5"
    w = CacheWriter(path, CONFIG)
    w.append(stamped(clip(0, "same.mp4"), 100))
    w.append(stamped(clip(1, "changed.mp4"), 101))
    w.append(clip(2, "unidentified.mp4"))  # no identity recorded (version 1): trusted
    w.append(stamped(clip(3, "gone.mp4"), 103))
    w.append(stamped(ClipRecord("broken.mp4", 0, "train", 0, error="no frame"), 104))
    w.append(stamped(ClipRecord("fixed.mp4", 0, "train", 0, error="no frame"), 105))
    w.append(stamped(clip(4, "failed later.mp4"), 106))
    w.finalize()
    w = CacheWriter(path, CONFIG)
    w.append(stamped(ClipRecord("failed later.mp4", 0, "train", 0, error="no frame"), 106))  # journal wins
    w.close()
    stamp = 1_700_000_000_000_000_000
    now = {
        "same.mp4": (100, stamp),
        "changed.mp4": (999, stamp),
        "unidentified.mp4": (102, stamp),
        "broken.mp4": (104, stamp),
        "fixed.mp4": (105, stamp + 1),
        "failed later.mp4": (106, stamp),
        "new.mp4": (107, stamp),
    }
    for writer in (w, CacheWriter(path, CONFIG)):  # the writer that journalled, and one resuming the journal
        rows, failures = writer.standing(now)
        assert rows == {"same.mp4", "unidentified.mp4"}
        assert failures == {"broken.mp4", "failed later.mp4"}


@pytest.mark.parametrize("assigned", ["every row", "some rows"])
@pytest.mark.parametrize("slab_bytes", [1, 1 << 24], ids=["row-by-row slabs", "one slab"])
def test_adding_clips_keeps_every_old_row_with_its_assignment_and_identity_in_parts_and_in_one_file(
    tmp_path, monkeypatch, assigned, slab_bytes
):
    """Adding clips writes the old rows' small columns anew from what the writer knows and (one file) copies
    their features in slabs: each row keeps its features, takes its (label, split) from the assignments where
    it has one and its identity from the current index; new keys sort between old ones, a dropped row splits
    the old rows' runs, and a parted cache equals the one-file cache."""
    import featpipe.cache.parts as fc

    monkeypatch.setattr(fc, "_SLAB_BYTES", slab_bytes)
    keys = [f"train/a/clip{i}.mp4" for i in range(10)]
    old, new, dropped = keys[0::2], keys[1::2], keys[4]
    stamp = 1_700_000_000_000_000_000
    assignments = {k: (i % 2, ("train", "val", "test")[i % 3]) for i, k in enumerate(keys)}
    if assigned == "some rows":
        assignments = {k: v for i, (k, v) in enumerate(assignments.items()) if i % 2}
    current = {k: (200 + i, stamp) for i, k in enumerate(keys) if k != dropped}
    for path, one_file in ((tmp_path / "parted.h5", False), (tmp_path / "one.h5", True)):
        monkeypatch.setenv("FEATPIPE_ONE_FILE_MB", "1000" if one_file else "0")
        w = CacheWriter(path, CONFIG)
        for k in old:
            w.append(stamped(clip(keys.index(k), k), 200 + keys.index(k)))
        w.finalize()
        w = CacheWriter(path, CONFIG)
        w.identities = current
        for k in new:
            w.append(clip(keys.index(k), k))  # stamped with its current identity by the writer
        w.finalize(assignments, current=current)
    parted_rows, one_rows = by_key(tmp_path / "parted.h5"), by_key(tmp_path / "one.h5")
    assert parted_rows == one_rows
    rows = parted_rows["rows"]
    assert sorted(rows) == sorted(current) and parted_rows["stale"] == {dropped: "no longer in the dataset"}
    for k in current:
        i = keys.index(k)
        features, mask, label, split, n_frames, size, mtime = rows[k]
        assert (features, mask, n_frames) == (clip(i, k).features.tobytes(), clip(i, k).mask.tobytes(), 30 + i)
        assert (label, split) == assignments.get(k, (i % 2, "train"))
        assert (size, mtime) == current[k]
    with h5py.File(tmp_path / "one.h5", "r") as f:
        assert list(f["video"].asstr()[:]) == sorted(current), "a one-file cache keeps its rows by key"
    assert len(part_files(tmp_path / "parted.h5")) == 2


# ----------------------------------------------------------------------------- readers and writers at once


def test_a_reader_keeps_reading_the_cache_it_opened_while_it_is_compacted_or_grown(tmp_path, parted):
    """Part files a replaced cache named stay while a reader holds it; rows never shift under it."""
    from featpipe.training.inputs import load_rows, open_index

    path = tmp_path / "c.h5"
    write_clips(path, KEYS[:4])
    w = CacheWriter(path, CONFIG)
    for key in KEYS[4:6]:
        w.append(clip(KEYS.index(key), key))
    w.finalize()
    old_parts = part_files(path)
    assert len(old_parts) == 2
    index = open_index(path)  # as train, evaluate and tune open it
    rows = np.arange(len(index.videos))
    expected = np.stack([clip(KEYS.index(k)).features for k in index.videos]).astype(np.float32)
    compact_cache(path)  # in place: one file, the two parts superseded
    x, _ = load_rows(index, rows)
    np.testing.assert_array_equal(x["features"], expected)  # not NaN where a part was
    assert part_files(path) == old_parts, "kept while a reader holds the cache that names them"
    w = CacheWriter(path, CONFIG)  # a clip whose key sorts first: every row of a rewritten cache moves
    w.append(clip(0, "test/a/0first.mp4"))
    w.finalize()
    x, _ = load_rows(index, rows)
    np.testing.assert_array_equal(x["features"], expected)
    index.close()
    CacheWriter(path, CONFIG)  # the next writer with no reader left removes them
    assert not set(part_files(path)) & set(old_parts)


def test_a_part_file_deleted_under_a_reader_is_a_sentence_naming_its_clips_never_nan(tmp_path, parted):
    from featpipe.errors import DamagedCacheError
    from featpipe.training.inputs import load_rows, open_index

    path = tmp_path / "c.h5"
    write_clips(path, KEYS[:2])
    w = CacheWriter(path, CONFIG)
    w.append(clip(2, KEYS[2]))
    w.finalize()
    index = open_index(path)
    with h5py.File(path, "r") as f:
        (tmp_path / f["parts/file"].asstr()[f["parts/index"][-1]]).unlink()  # not featpipe: by hand
    with pytest.raises(DamagedCacheError, match=f"is missing.*clip '{KEYS[2]}'"):
        load_rows(index, np.arange(3))


READER = """
import sys
import numpy as np
from featpipe.training.inputs import load_rows, open_index
index = open_index(sys.argv[1])
print("open", flush=True)
sys.stdin.readline()
x, _ = load_rows(index, np.arange(len(index.videos)))
print("finite" if np.isfinite(x["features"]).all() else "NaN", len(x["features"]), flush=True)
"""


def test_a_reader_in_another_process_keeps_the_parts_it_reads_until_it_is_done(tmp_path, parted):
    path = tmp_path / "c.h5"
    write_clips(path, KEYS[:4])
    old = part_files(path)
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert reader.stdout.readline().strip() == "open"
        compact_cache(path)  # `featpipe merge --compact` while `train` reads
        assert part_files(path) == old
        reader.stdin.write("go\n")
        reader.stdin.flush()
        assert reader.stdout.readline().split() == ["finite", "4"]
        assert reader.wait(timeout=120) == 0
    finally:
        if reader.poll() is None:
            reader.kill()
    CacheWriter(path, CONFIG)  # no reader left: the next writer removes them
    assert not part_files(path)
