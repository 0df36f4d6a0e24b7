"""Reading caches for training: validation, statistics over real train frames, streaming batches."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest

from featpipe.cache.schema import CacheConfig, ClipRecord
from featpipe.cache.writer import CacheWriter
from featpipe.errors import CacheError
from featpipe.training.inputs import (
    cache_fingerprint,
    check_finite,
    choose_stream,
    feature_stats,
    load_rows,
    open_index,
    resolve_cache,
)
from featpipe.training.streaming import H5Batches

T, D = 5, 4


def make_cache(path, n=12, splits=("train", "val", "test"), classes=("a", "b"), nan_row=None, seed=0, dtype="float32"):
    """A small cache written through the real writer, with known features."""
    rng = np.random.default_rng(seed)
    config = CacheConfig("vgg16", "none", "fp", 32, T, "uniform", dtype, (D,), tuple(classes))
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
    monkeypatch.setattr("featpipe.training.inputs.physical_memory", lambda: idx.features_nbytes_f32 * 2)
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


def _epoch(seq):
    """One epoch of a streamed dataset: the row (feature 0) of every sample, batch by batch."""
    return [[int(r) for r in x["features"][:, 0, 0]] for x, _ in (seq[i] for i in range(len(seq)))]


def test_block_shuffling_serves_every_row_once_per_epoch_in_a_new_order_each_epoch(tmp_path):
    path = make_cache(tmp_path / "c.h5", n=240, splits=("train",))
    idx = open_index(path)
    rows = np.arange(240)
    seq = H5Batches(path, rows, idx.labels, batch_size=16, shuffle=True, seed=3, block_rows=4, window_batches=4)
    epochs = []
    for _ in range(3):
        batches = _epoch(seq)
        flat = [r for b in batches for r in b]
        assert sorted(flat) == list(range(240)), "every row exactly once per epoch"
        assert [len(b) for b in batches] == [16] * 15
        epochs.append(flat)
        seq.on_epoch_end()
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0], "a new order every epoch"
    # a batch mixes rows from many places of the file, not one run of neighbours
    spread = [len({r // 4 for r in b}) for b in _epoch(seq)]
    assert np.mean(spread) >= 4
    seq.close()


def test_block_shuffling_is_deterministic_for_a_seed(tmp_path):
    path = make_cache(tmp_path / "c.h5", n=100)
    idx = open_index(path)
    rows = idx.rows("train")

    def make(seed):
        return H5Batches(
            path, rows, idx.labels[rows], batch_size=4, shuffle=True, seed=seed, block_rows=2, window_batches=2
        )

    a, b, c = make(7), make(7), make(8)
    for _ in range(2):
        assert _epoch(a) == _epoch(b)
        assert _epoch(a) != _epoch(c)
        for s in (a, b, c):
            s.on_epoch_end()
    # the order does not depend on which batches were asked for first, nor from which thread
    from concurrent.futures import ThreadPoolExecutor

    serial = _epoch(a)
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda i: [int(r) for r in b[len(b) - 1 - i][0]["features"][:, 0, 0]], range(len(b))))
    assert threaded[::-1] == serial
    for s in (a, b, c):
        s.close()


def test_streamed_memory_is_bounded_by_the_windows_held(tmp_path, monkeypatch):
    path = make_cache(tmp_path / "c.h5", n=200, splits=("train",))
    idx = open_index(path)
    seq = H5Batches(
        path,
        np.arange(200),
        idx.labels,
        batch_size=8,
        shuffle=True,
        seed=0,
        block_rows=4,
        window_batches=3,
        max_windows=2,
    )
    reads = []
    original = type(seq)._read_window
    monkeypatch.setattr(type(seq), "_read_window", lambda self, w: reads.append(w) or original(self, w))
    limit = 2 * 3 * 8  # max_windows * window_batches * batch_size rows
    for i in range(len(seq)):
        seq[i]
        assert 0 < seq.held_rows <= limit
    assert reads == list(range(math.ceil(200 / 24))), "in order, each window is read once"
    # any order (e.g. Keras shuffling batches) stays correct and bounded, only slower
    rng = np.random.default_rng(0)
    for i in rng.permutation(len(seq)):
        seq[int(i)]
        assert seq.held_rows <= limit
    seq.on_epoch_end()
    assert seq.held_rows == 0
    seq.close()


def test_a_window_is_read_in_few_large_reads(tmp_path, monkeypatch):
    path = make_cache(tmp_path / "c.h5", n=120, splits=("train",))
    idx = open_index(path)
    calls = []
    original = h5py.Dataset.read_direct
    monkeypatch.setattr(h5py.Dataset, "read_direct", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    seq = H5Batches(
        path, np.arange(120), idx.labels, batch_size=10, shuffle=True, seed=0, block_rows=5, window_batches=3
    )
    _epoch(seq)
    # 120 rows in 24 blocks of 5: one read per block (two where the random offset cuts one), never one per row
    assert len(calls) <= 24 + 4
    seq.close()


def test_rows_of_one_split_with_gaps_are_streamed_exactly(tmp_path):
    path = make_cache(tmp_path / "c.h5", n=60)  # train is every third row: reads span the gaps
    idx = open_index(path)
    for rows in (idx.rows("train"), np.array([50, 3, 27, 3, 59, 0, 12])):  # gaps, any order, a repeat
        unique, where = np.unique(rows, return_inverse=True)
        memory, labels = load_rows(idx, unique)
        memory, labels = {k: v[where] for k, v in memory.items()}, labels[where]
        seq = H5Batches(path, rows, idx.labels[rows], batch_size=3)
        got = [seq[i] for i in range(len(seq))]
        np.testing.assert_array_equal(np.concatenate([x["features"] for x, _ in got]), memory["features"])
        np.testing.assert_array_equal(np.concatenate([x["mask"] for x, _ in got]), memory["mask"])
        np.testing.assert_array_equal(np.concatenate([y for _, y in got]), labels)
        seq.close()


def test_float16_caches_stream_in_float16_with_the_values_held_in_memory(tmp_path):
    path = make_cache(tmp_path / "c.h5", n=30, dtype="float16")
    idx = open_index(path)
    rows = idx.rows("train")
    memory, _ = load_rows(idx, rows)
    as_stored = H5Batches(path, rows, idx.labels[rows], batch_size=4, shuffle=True, seed=2, dtype=None)
    as_float32 = H5Batches(path, rows, idx.labels[rows], batch_size=4, shuffle=True, seed=2)
    for i in range(len(as_stored)):
        (x16, y16), (x32, y32) = as_stored[i], as_float32[i]
        assert x16["features"].dtype == np.float16 and x32["features"].dtype == np.float32
        expected = memory["features"][as_stored._order[i * 4 : (i + 1) * 4]]
        np.testing.assert_array_equal(x16["features"].astype(np.float32), expected)
        np.testing.assert_array_equal(x32["features"], expected)
        np.testing.assert_array_equal(y16, y32)
    as_stored.close()
    as_float32.close()


def test_sample_weights_follow_their_rows_and_the_dataset_pickles(tmp_path):
    import pickle

    path = make_cache(tmp_path / "c.h5", n=40, splits=("train",))
    idx = open_index(path)
    rows = np.arange(40)
    weights = rows.astype(np.float32) / 10
    seq = H5Batches(path, rows, idx.labels, batch_size=8, shuffle=True, seed=1, sample_weight=weights)
    for i in range(len(seq)):
        x, y, w = seq[i]
        np.testing.assert_array_equal(w, x["features"][:, 0, 0] / 10)
    copy = pickle.loads(pickle.dumps(seq))  # use_multiprocessing sends the dataset to worker processes
    np.testing.assert_array_equal(copy[2][0]["features"], seq[2][0]["features"])
    copy.close()
    seq.close()


def test_streaming_allocator_undoes_tensorflows_pin_during_fit_and_restores_it_after(monkeypatch):
    """On TensorFlow+glibc, streaming undoes the 128 KiB mmap threshold tf.data's generator op pins (see batches.py)."""
    import featpipe.training.streaming as batches

    state = {}  # glibc's thresholds as the fake mallopt leaves them: parameter -> value

    def fake_mallopt(param, value):
        state[param] = value
        return 1

    monkeypatch.setattr(batches, "_mallopt", lambda: fake_mallopt)
    mmap, trim = -3, -1
    with batches.streaming_allocator() as callbacks:
        assert (state[mmap], state[trim]) == batches.MALLOC_THRESHOLDS
        state[mmap] = 128 << 10  # TensorFlow starts a generator op (a new epoch) and pins its threshold again
        for callback in callbacks:
            callback.on_train_batch_begin(0)
        assert (state[mmap], state[trim]) == batches.MALLOC_THRESHOLDS
    assert (state[mmap], state[trim]) == batches.TF_MALLOC  # given back after fit
    with pytest.raises(KeyboardInterrupt), batches.streaming_allocator():
        raise KeyboardInterrupt  # Ctrl-C during fit gives it back too
    assert (state[mmap], state[trim]) == batches.TF_MALLOC
    state.clear()
    with batches.streaming_allocator(enabled=False) as callbacks:  # in memory: nothing is touched
        assert callbacks == [] and state == {}


def test_fitting_from_the_stream_is_deterministic_for_a_seed(tmp_path):
    import keras

    from featpipe.training.heads.config import HeadConfig
    from featpipe.training.heads.registry import build_head

    path = make_cache(tmp_path / "c.h5", n=64, splits=("train",))
    idx = open_index(path)
    rows = np.arange(64)

    def fit():
        keras.utils.set_random_seed(0)
        model = build_head(HeadConfig("gru", units=4), (D,), 2, np.zeros(D, np.float32), np.ones(D, np.float32))
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        data = H5Batches(
            path,
            rows,
            idx.labels,
            batch_size=8,
            shuffle=True,
            seed=5,
            block_rows=2,
            window_batches=2,
            dtype=None,
            workers=2,
            use_multiprocessing=False,
            max_queue_size=4,
        )
        model.fit(data, epochs=2, shuffle=False, verbose=0)
        data.close()
        return model.get_weights()

    for a, b in zip(fit(), fit()):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- temporal augmentation, PCA (issue 10)


def test_subset_positions_match_the_model_layer_and_video_sampling():
    from featpipe.training.heads.layers import FrameSubset
    from featpipe.training.inputs import subset_positions
    from featpipe.video.decode import sample_indices

    counts = np.array([0, 1, 6, 7, 20, 39, 150])
    pos, keep = subset_positions(counts, 7)
    layer_pos, layer_keep = (np.asarray(a) for a in FrameSubset(7).positions(counts, training=False))
    np.testing.assert_array_equal(pos, layer_pos)
    np.testing.assert_array_equal(keep, layer_keep)
    for b, n in enumerate(counts):
        np.testing.assert_array_equal(pos[b][keep[b]], sample_indices(int(n), 7))


def test_training_subsets_are_sorted_real_frames_one_per_segment_and_reproducible_from_the_seed():
    from featpipe.training.inputs import subset_positions

    counts = np.array([3, 20, 41, 150])
    epochs = [subset_positions(counts, 10, np.random.default_rng([7, e])) for e in range(5)]
    for pos, keep in epochs:
        for b, n in enumerate(counts):
            p = pos[b][keep[b]]
            assert len(p) == min(n, 10) and np.all(np.diff(p) > 0) and 0 <= p.min() and p.max() < n
    assert len({pos[3].tobytes() for pos, _ in epochs}) == 5, "every epoch draws another subset of a long clip"
    again = subset_positions(counts, 10, np.random.default_rng([7, 0]))
    np.testing.assert_array_equal(again[0], epochs[0][0])


def test_pca_whitening_of_train_frames_has_unit_variance_and_ignores_padding(tmp_path):
    from featpipe.training.inputs import pca_whitening

    idx = open_index(make_cache(tmp_path / "c.h5", n=60))
    rows = idx.rows("train")
    mean, var = feature_stats(idx, rows)
    w = pca_whitening(idx, rows, mean, var, 3)
    x, _ = load_rows(idx, rows)
    real = x["features"][x["mask"]].astype(np.float64)
    z = (real - mean) / np.sqrt(var) @ w
    np.testing.assert_allclose(np.cov(z, rowvar=False), np.eye(3), atol=1e-3)
    with pytest.raises(Exception, match="at most the feature size"):
        pca_whitening(idx, rows, mean, var, D + 1)
