"""Reading caches for training: validation, statistics over real train frames, streaming batches."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from featpipe.cache import CacheConfig, CacheWriter, ClipRecord
from featpipe.data import (
    H5Batches,
    cache_fingerprint,
    check_finite,
    choose_stream,
    feature_stats,
    load_rows,
    open_index,
    resolve_cache,
)
from featpipe.errors import CacheError

T, D = 5, 4


def make_cache(path, n=12, splits=("train", "val", "test"), classes=("a", "b"), nan_row=None, seed=0):
    """A small cache written through the real writer, with known features."""
    rng = np.random.default_rng(seed)
    config = CacheConfig("vgg16", "none", "fp", 32, T, "uniform", "float32", (D,), tuple(classes))
    w = CacheWriter(path, config)
    for i in range(n):
        real = 1 + i % T
        feats = np.zeros((T, D), np.float32)
        feats[:real] = rng.normal(i, 1, (real, D))
        feats[:real, 0] = i  # feature 0 of every real frame names its row
        if i == nan_row:
            feats[0, 0] = np.nan
        mask = np.arange(T) < real
        w.append(ClipRecord(f"v{i:03d}.mp4", i % len(classes), splits[i % len(splits)], real, feats, mask))
    w.finalize()
    return path


def test_index_reads_labels_splits_and_masks_but_not_features(tmp_path):
    idx = open_index(make_cache(tmp_path / "c.h5"))
    assert len(idx.labels) == 12 and idx.class_names == ("a", "b")
    assert list(idx.rows("train")) == [0, 3, 6, 9]
    assert idx.mask.shape == (12, T) and idx.features_nbytes_f32 == 12 * T * D * 4


def test_stats_use_only_real_frames_of_the_given_rows(tmp_path):
    path = make_cache(tmp_path / "c.h5")
    idx = open_index(path)
    rows = idx.rows("train")
    with h5py.File(path) as f:
        real = np.concatenate([f["features"][r][f["mask"][r]] for r in rows])
    mean, var = feature_stats(idx, rows)
    np.testing.assert_allclose(mean, real.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(var, real.var(axis=0), rtol=1e-4)


def test_load_rows_keeps_the_requested_order(tmp_path):
    path = make_cache(tmp_path / "c.h5")
    idx = open_index(path)
    x, y = load_rows(idx, np.array([7, 2, 9]))
    with h5py.File(path) as f:
        np.testing.assert_array_equal(x["features"][0], f["features"][7])
        np.testing.assert_array_equal(x["mask"][2], f["mask"][9])
    assert list(y) == [idx.labels[7], idx.labels[2], idx.labels[9]]


def test_streamed_batches_hold_the_same_rows_as_memory_and_reshuffle_each_epoch(tmp_path):
    path = make_cache(tmp_path / "c.h5", n=30)
    idx = open_index(path)
    rows = np.arange(30)
    seq = H5Batches(path, rows, idx.labels, batch_size=8, shuffle=True, seed=1)
    assert len(seq) == 4
    seen, first_epoch = [], []
    for i in range(len(seq)):
        x, y = seq[i]
        for feats, label in zip(x["features"], y):
            row = int(feats[0, 0])
            seen.append(row)
            assert label == idx.labels[row]
        first_epoch.append(y.copy())
    assert sorted(seen) == list(range(30)), "every row exactly once per epoch"
    assert seen != sorted(seen), "rows are shuffled, not read in file order"
    memory, _ = load_rows(idx, rows)
    x0, _ = seq[0]
    order = seq._order[:8].copy()
    np.testing.assert_array_equal(x0["features"], memory["features"][order])
    seq.on_epoch_end()
    assert not np.array_equal(seq._order[:8], order)
    seq.close()


def test_streaming_is_chosen_for_caches_larger_than_a_quarter_of_memory(tmp_path, monkeypatch):
    idx = open_index(make_cache(tmp_path / "c.h5"))
    assert choose_stream(idx, None) is False
    assert choose_stream(idx, True) is True
    monkeypatch.setattr("featpipe.data.physical_memory", lambda: idx.features_nbytes_f32 * 2)
    assert choose_stream(idx, None) is True


def test_nan_features_are_refused_naming_the_clip(tmp_path):
    idx = open_index(make_cache(tmp_path / "c.h5", nan_row=4))
    with pytest.raises(CacheError, match="v004.mp4.*NaN"):
        check_finite(idx, np.arange(12))


def test_one_cache_is_found_in_the_cache_folder_and_several_are_refused(tmp_path):
    with pytest.raises(CacheError, match="No cache"):
        resolve_cache(None, tmp_path)
    make_cache(tmp_path / "one.h5")
    assert resolve_cache(None, tmp_path) == tmp_path / "one.h5"
    make_cache(tmp_path / "two.h5")
    with pytest.raises(CacheError, match="Several caches.*one.h5.*two.h5.*--cache"):
        resolve_cache(None, tmp_path)


def test_fingerprint_changes_with_the_clip_index(tmp_path):
    a = cache_fingerprint(make_cache(tmp_path / "a.h5"))
    assert a == cache_fingerprint(tmp_path / "a.h5")
    assert a != cache_fingerprint(make_cache(tmp_path / "b.h5", n=11))


def test_one_pass_stats_with_check_equal_plain_stats_and_catch_nan_outside_train(tmp_path):
    idx = open_index(make_cache(tmp_path / "c.h5"))
    train = idx.rows("train")
    plain = feature_stats(idx, train)
    checked = feature_stats(idx, train, check=np.arange(12))
    np.testing.assert_allclose(checked[0], plain[0])
    np.testing.assert_allclose(checked[1], plain[1])
    bad = open_index(make_cache(tmp_path / "nan.h5", nan_row=4))  # row 4 is in the val split
    assert bad.splits[4] == "val"
    feature_stats(bad, bad.rows("train"))  # train rows alone are clean
    with pytest.raises(CacheError, match="v004.mp4"):
        feature_stats(bad, bad.rows("train"), check=np.arange(12))
