"""featpipe.info and `featpipe info`: checksums (`--verify`), damaged rows named in train, and bad input."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

import featpipe
from cli_args import cli as run
from featpipe.cache.verify import verify_cache
from featpipe.errors import CacheError, DamagedCacheError
from featpipe.training.inputs import feature_stats, load_rows, open_index
from featpipe.training.streaming import H5Batches
from test_inputs import make_cache  # a small cache written through the real writer

DAMAGED = 5  # the row whose bytes are flipped; make_cache names it v005.mp4


def flip_bytes_in_row(path, row: int) -> None:
    """Flip a few bytes inside the stored chunk (the features) of ``row``, as a bad disk or copy would."""
    with h5py.File(path, "r") as f:
        ds = f["features"]
        assert ds.chunks[0] == 1, "one row per chunk"
        info = ds.id.get_chunk_info_by_coord((row,) + (0,) * (ds.ndim - 1))
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + 8)
        data = fh.read(4)
        fh.seek(info.byte_offset + 8)
        fh.write(bytes(b ^ 0x5A for b in data))


@pytest.fixture
def damaged(tmp_path):
    path = make_cache(tmp_path / "c.h5", n=12)
    flip_bytes_in_row(path, DAMAGED)
    return path


def test_features_are_stored_with_a_checksum_plain_h5py_still_reads(tmp_path):
    path = make_cache(tmp_path / "c.h5", n=3)
    with h5py.File(path, "r") as f:
        assert f["features"].fletcher32
        assert f["features"][0].shape == f["features"].shape[1:]
    assert verify_cache(path).damaged == []


def test_info_verify_says_every_row_was_verified(tmp_path):
    path = make_cache(tmp_path / "c.h5", n=12)
    assert featpipe.info(path, verify=True)[-1].strip() == "all 12 rows verified (fletcher32 checksums)."
    result = run("info", path, "--verify")
    assert result.exit_code == 0 and "all 12 rows verified" in result.output


def test_info_verify_names_the_damaged_clip_and_exits_1(damaged):
    with pytest.raises(DamagedCacheError, match="'v005.mp4'") as info:
        featpipe.info(damaged, verify=True)
    assert "v004.mp4" not in str(info.value) and "featpipe extract" in str(info.value)
    result = run("info", damaged, "--verify")
    assert result.exit_code == 1
    assert "v005.mp4" in result.output and "fail their checksum" in result.output
    assert run("info", damaged).exit_code == 0, "without --verify, info reads no features"


def test_reading_a_damaged_row_for_training_names_the_clip(damaged):
    index = open_index(damaged)
    everything = np.arange(12)
    with pytest.raises(DamagedCacheError, match="'v005.mp4'.*re-extract"):
        feature_stats(index, everything)
    with pytest.raises(DamagedCacheError, match="'v005.mp4'"):
        load_rows(index, np.array([7, DAMAGED, 1]))
    load_rows(index, np.array([0, 1, 2, 3, 4]))  # the intact rows still read
    batches = H5Batches(damaged, everything, index.labels, batch_size=4)
    try:
        with pytest.raises(DamagedCacheError, match="'v005.mp4'"):
            batches[1]
    finally:
        batches.close()


def test_train_on_a_damaged_cache_fails_with_one_sentence_naming_the_clip(damaged, tmp_path):
    result = run("train", "--cache", damaged, "--epochs", "1", "--units", "4", "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 1
    assert "v005.mp4" in result.output and "fail their checksum" in result.output
    assert not (tmp_path / "run").exists()


def test_a_cache_without_checksums_still_reads_and_verify_says_so(tmp_path):
    path = make_cache(tmp_path / "c.h5", n=6)
    with h5py.File(path, "r+") as f:  # what featpipe wrote before checksums: the same data, no filter
        data = f["features"][()]
        del f["features"]
        f.create_dataset("features", data=data, chunks=(1, *data.shape[1:]))
    index = open_index(path)
    x, _ = load_rows(index, np.arange(6))
    np.testing.assert_array_equal(x["features"], data)
    line = featpipe.info(path, verify=True)[-1]
    assert "all 6 rows read" in line and "carries no checksum" in line
    assert run("info", path, "--verify").exit_code == 0


def test_info_on_a_cache_without_its_failed_group_is_one_sentence(tmp_path):
    path = make_cache(tmp_path / "c.h5", n=3)
    with h5py.File(path, "r+") as f:
        del f["failed"]
    with pytest.raises(CacheError, match="lacks failed/video, failed/reason"):
        featpipe.info(path)
    result = run("info", path)
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "failed/video" in result.output


@pytest.mark.parametrize("what", ["text", "empty", "missing", "hdf5"])
def test_info_on_garbage_is_one_sentence(tmp_path, what):
    path = tmp_path / "thing.h5"
    if what == "text":
        path.write_text("not a cache at all\n")
    elif what == "empty":
        path.write_bytes(b"")
    elif what == "hdf5":
        with h5py.File(path, "w") as f:
            f["x"] = [1, 2, 3]
    result = run("info", path)
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    assert str(path) in result.output


def test_verify_of_a_run_directory_is_refused_with_a_sentence(tmp_path):
    (tmp_path / "run").mkdir()
    result = run("info", tmp_path / "run", "--verify")
    assert result.exit_code == 2 and "--verify checks a cache file" in result.output


def test_adding_clips_to_a_damaged_cache_names_the_clip_and_keeps_the_file(damaged):
    """A resumed extraction folds old rows into the new cache: a damaged one stops it with a sentence."""
    from featpipe.cache.reader import open_h5
    from featpipe.cache.schema import CacheConfig, ClipRecord
    from featpipe.cache.writer import CacheWriter

    with open_h5(damaged) as f:
        config = CacheConfig.from_attrs(dict(f.attrs))
    before = damaged.read_bytes()
    writer = CacheWriter(damaged, config)
    t, d = config.frames, config.feature_shape[0]
    writer.append(ClipRecord("new.mp4", 0, "train", 1, np.zeros((t, d), np.float32), np.arange(t) < 1))
    with pytest.raises(DamagedCacheError, match=f"v{DAMAGED:03d}.mp4"):
        writer.finalize()
    assert damaged.read_bytes() == before, "the damaged cache is left as it was"
    assert not list(damaged.parent.glob(damaged.name + ".tmp-*")), "no temporary file is left behind"


# ----------------------------------------------------------------------------- masks and part files

T = 5  # frames per clip in make_cache; row i has 1 + i % T real frames


def flip_mask_byte(path, row: int, frame: int) -> None:
    """Flip one byte of the stored mask (True <-> False), as a bad disk or copy would."""
    with h5py.File(path, "r") as f:
        ds = f["mask"]
        assert ds.chunks is None and ds.shape[1] == T
        offset = ds.id.get_offset() + row * T + frame
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ 0x01]))


def test_a_flipped_mask_byte_is_found_by_verify_and_stops_training(tmp_path):
    path = make_cache(tmp_path / "c.h5", n=12)
    flip_mask_byte(path, DAMAGED, 1 + DAMAGED % T)  # v005: its first padded frame turns real, still a prefix
    with h5py.File(path, "r") as f:
        assert list(f["mask"][DAMAGED]) == [True, True, False, False, False]
    with pytest.raises(DamagedCacheError, match="frame mask of clip 'v005.mp4'") as info:
        featpipe.info(path, verify=True)
    assert "v004.mp4" not in str(info.value)
    result = run("info", path, "--verify")
    assert result.exit_code == 1 and "v005.mp4" in result.output
    with pytest.raises(DamagedCacheError, match="v005.mp4"):
        open_index(path)  # train, evaluate and tune read the masks through it


def test_a_cache_without_mask_checksums_is_read_and_its_masks_must_be_real_frames_first(tmp_path):
    path = make_cache(tmp_path / "c.h5", n=6)
    with h5py.File(path, "r+") as f:  # what featpipe wrote before masks carried checksums
        if "mask_crc32" in f:
            del f["mask_crc32"]
    x, _ = load_rows(open_index(path), np.arange(6))
    assert "all 6 rows verified" in featpipe.info(path, verify=True)[-1]
    flip_mask_byte(path, 1, 3)  # v001 holds 2 real frames: now True, True, False, True, False
    result = run("info", path, "--verify")
    assert result.exit_code == 1 and "frame mask of clip 'v001.mp4'" in result.output


@pytest.mark.parametrize("how", ["truncated", "not hdf5"])
def test_verify_reports_an_unreadable_part_file_as_the_clips_it_held(tmp_path, monkeypatch, how):
    from featpipe.cache.reader import open_h5
    from featpipe.cache.schema import CacheConfig, ClipRecord
    from featpipe.cache.writer import CacheWriter

    monkeypatch.setenv("FEATPIPE_ONE_FILE_MB", "0")  # every cache in part files
    path = make_cache(tmp_path / "c.h5", n=6)
    with open_h5(path) as f:
        config = CacheConfig.from_attrs(dict(f.attrs))
    writer = CacheWriter(path, config)
    for i in range(3):  # a second part file, holding only these
        writer.append(ClipRecord(f"w{i}.mp4", 0, "train", 1, np.ones((T, config.feature_shape[0])), np.arange(T) < 1))
    writer.finalize()
    with h5py.File(path, "r") as f:
        part = path.parent / f["parts/file"].asstr()[f["parts/index"][-1]]
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2] if how == "truncated" else b"not an HDF5 file\n" * 100)
    result = run("info", path, "--verify")
    assert result.exit_code == 1, result.output
    out = " ".join(result.output.split())
    assert part.name in out and "'w0.mp4', 'w1.mp4', 'w2.mp4'" in out and "v000.mp4" not in out
    index = open_index(path)
    with pytest.raises(DamagedCacheError, match=f"{part.name}.*'w0.mp4'"):  # training reads it: a sentence, never NaN
        load_rows(index, np.arange(len(index.videos)))
