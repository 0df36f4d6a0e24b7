"""Reading a cache: every way a file can be wrong is one sentence; the summary; damaged part files."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest

from cache_helpers import CONFIG, DATASETS, KEYS, by_key, clip, merge_cli, read_all, write_clips
from featpipe.cache.reader import open_h5, read_config, summarize
from featpipe.cache.schema import SCHEMA_VERSION, ClipRecord, parts_dir
from featpipe.cache.shards import compact_cache
from featpipe.cache.writer import CacheWriter
from featpipe.errors import CacheError

pytestmark = pytest.mark.usefixtures("default_threshold")  # featpipe's default one-file threshold


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
