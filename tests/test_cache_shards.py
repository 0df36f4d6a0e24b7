"""Shards and merging: the assignment of clips to shards, merge and its refusals, compact, kills mid-merge."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from cache_helpers import (
    CONFIG,
    DATASETS,
    IDENT,
    KEYS,
    by_key,
    clip,
    downgrade_to_version_1,
    identified,
    killed,
    merge_cli,
    part_files,
    read_all,
    refused,
    write_clips,
    write_shards,
)
from featpipe.cache.lock import CacheLock
from featpipe.cache.reader import summarize
from featpipe.cache.schema import SCHEMA_VERSION, journal_path, parts_dir
from featpipe.cache.shards import merge_shards, parse_shard, parse_shard_path, shard_of, shard_path
from featpipe.cache.writer import CacheWriter
from featpipe.errors import FeatpipeError

pytestmark = pytest.mark.usefixtures("default_threshold")  # featpipe's default one-file threshold


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


def test_merge_carries_identity_and_stale_rows_and_accepts_a_version_1_shard(tmp_path):
    out = tmp_path / "c.h5"
    for i in (1, 2):
        w = CacheWriter(shard_path(out, i, 2), replace(CONFIG, extra={"shard": f"{i}/2"}))
        for key in (k for k in IDENT if shard_of(k, 2) == i):
            w.append(identified(int(key[-5]), key))
        w.finalize(current={k: v for k, v in IDENT.items() if shard_of(k, 2) == i} | {"gone.mp4": None})
    downgrade_to_version_1(shard_path(out, 2, 2))
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
