"""Part files: a large cache keeps its features in immutable parts; adding clips writes only the new ones."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from cache_helpers import CONFIG, IDENT, KEYS, D, T, by_key, clip, identified, part_files, write_clips
from featpipe.cache.reader import summarize
from featpipe.cache.schema import SCHEMA_VERSION, ClipRecord, parts_dir
from featpipe.cache.verify import has_checksums
from featpipe.cache.writer import CacheWriter

pytestmark = pytest.mark.usefixtures("default_threshold")  # featpipe's default one-file threshold


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
