"""Tests for featpipe.training.heads: mask-aware sequence classifiers (small dims, CPU, fast)."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from featpipe.errors import FeatpipeError, OptionError
from featpipe.training.heads.config import HeadConfig
from featpipe.training.heads.layers import (
    FrameSubset,
    MaskedAttentionPooling,
    MaskedAverage,
    SegmentMeans,
    SinusoidalPositionEncoding,
    ZeroPadded,
)
from featpipe.training.heads.registry import HEADS, build_head
from featpipe.training.heads.shortcut import SHORTCUT_C, fit_shortcut

D = 12  # feature dim for the feature heads
T = 6  # clip length in the test batch
IMAGE = (16, 16, 3)  # raw frames for cnn-lstm
N_CLASSES = 3
LENGTHS = (1, 3, 6, 4)  # real frames per clip: includes a 1-frame clip and a full clip
ORDER_SENSITIVE = ("gru", "lstm", "bilstm", "attention", "transformer", "segments")


def feature_shape(head: str) -> tuple[int, ...]:
    return IMAGE if head == "cnn-lstm" else (D,)


def stats(head: str):
    """Non-trivial train statistics (so padded zeros become NON-zero after Normalization)."""
    if head == "cnn-lstm":
        return None, None
    rng = np.random.default_rng(1)
    return rng.normal(size=D).astype("float32"), rng.uniform(0.5, 2.0, size=D).astype("float32")


def make(head: str, seed: int = 0, **overrides) -> keras.Model:
    keras.utils.set_random_seed(seed)
    config = HeadConfig(**{"head": head, "units": 8, "layers": 1, "num_heads": 2, **overrides})
    mean, variance = stats(head)
    return build_head(config, feature_shape(head), N_CLASSES, mean=mean, variance=variance)


def make_batch(head: str, lengths=LENGTHS, t: int = T, seed: int = 0):
    """Features with zeros at padded steps (as the cache stores them) and the frame mask."""
    rng = np.random.default_rng(seed)
    shape = feature_shape(head)
    if head == "cnn-lstm":
        x = rng.integers(0, 256, size=(len(lengths), t, *shape)).astype("float32")
    else:
        x = rng.normal(size=(len(lengths), t, *shape)).astype("float32")
    mask = np.arange(t)[None, :] < np.asarray(lengths)[:, None]
    x[~mask] = 0.0
    return x, mask


def predict(model, x, mask) -> np.ndarray:
    return np.asarray(model({"features": x, "mask": mask}, training=False))


@pytest.fixture(scope="module")
def built():
    """One model per head, built once for the module (building is the slow part)."""
    return {head: make(head) for head in HEADS}


def garbage_like(x, seed=5):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=x.shape) * 1000.0 + 77.0).astype("float32")


# ------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_output_is_probabilities_of_shape_batch_by_classes(built, head):
    model = built[head]
    x, mask = make_batch(head)
    probs = model.predict({"features": x, "mask": mask}, verbose=0)
    assert probs.shape == (len(LENGTHS), N_CLASSES)
    assert np.all(probs >= 0.0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("head", HEADS)
def test_inputs_are_named_with_free_time_dimension_and_bool_mask(built, head):
    model = built[head]
    specs = {t.name: t for t in model.inputs}
    assert set(specs) == {"features", "mask"}
    assert tuple(specs["features"].shape) == (None, None, *feature_shape(head))
    assert specs["features"].dtype == "float32"
    assert tuple(specs["mask"].shape) == (None, None)
    assert specs["mask"].dtype == "bool"


# ------------------------------------------------------------------------------------------
# Mask-awareness
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_changing_padded_values_does_not_change_predictions(built, head):
    model = built[head]
    x, mask = make_batch(head)
    before = predict(model, x, mask)
    x2 = x.copy()
    x2[~mask] = garbage_like(x)[~mask]
    np.testing.assert_allclose(predict(model, x2, mask), before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head", HEADS)
def test_nan_and_inf_at_padded_steps_do_not_leak(built, head):
    model = built[head]
    x, mask = make_batch(head)
    before = predict(model, x, mask)
    x2 = x.copy()
    x2[0, 1:] = np.nan  # clip 0 has 1 real frame
    x2[1, 3:] = np.inf
    x2[3, 4:] = -np.inf
    after = predict(model, x2, mask)
    assert np.all(np.isfinite(after))
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head", HEADS)
def test_appending_padded_steps_does_not_change_predictions(built, head):
    model = built[head]
    x, mask = make_batch(head)
    before = predict(model, x, mask)
    extra = 5
    pad = np.zeros((len(LENGTHS), extra, *feature_shape(head)), "float32")
    x_zero = np.concatenate([x, pad], axis=1)
    x_junk = np.concatenate([x, garbage_like(pad)], axis=1)
    mask_long = np.concatenate([mask, np.zeros((len(LENGTHS), extra), bool)], axis=1)
    np.testing.assert_allclose(predict(model, x_zero, mask_long), before, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(predict(model, x_junk, mask_long), before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head", HEADS)
def test_masking_holds_inside_model_even_without_input_zeroing(head, monkeypatch):
    """The input ZeroPadded layer is only a safety net: with it disabled, the explicit masks of
    the RNN / attention / pooling layers alone must keep padded values out (2 stacked layers)."""
    monkeypatch.setattr(ZeroPadded, "call", lambda self, inputs, mask=None: inputs)
    model = make(head, layers=2)
    x, mask = make_batch(head)
    before = predict(model, x, mask)
    x2 = x.copy()
    x2[~mask] = garbage_like(x)[~mask]
    np.testing.assert_allclose(predict(model, x2, mask), before, rtol=1e-5, atol=1e-6)
    x3 = np.concatenate([x, garbage_like(x[:, :3])], axis=1)
    mask3 = np.concatenate([mask, np.zeros((len(LENGTHS), 3), bool)], axis=1)
    np.testing.assert_allclose(predict(model, x3, mask3), before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head", HEADS)
def test_changing_a_real_frame_changes_predictions(built, head):
    model = built[head]
    x, mask = make_batch(head)
    before = predict(model, x, mask)
    x2 = x.copy()
    x2[:, 0] = garbage_like(x[:, 0]) if head != "cnn-lstm" else 255.0 - x[:, 0]  # first frame is always real
    after = predict(model, x2, mask)
    for i in range(len(LENGTHS)):
        assert not np.allclose(after[i], before[i], rtol=1e-4, atol=1e-6), f"clip {i} ignored its real frame"


def reverse_real_frames(x, mask):
    out = x.copy()
    for i, n in enumerate(mask.sum(axis=1)):
        out[i, :n] = x[i, :n][::-1]
    return out


@pytest.mark.parametrize("head", ORDER_SENSITIVE)
def test_reversing_real_frames_changes_predictions_of_sequence_heads(built, head):
    model = built[head]
    x, mask = make_batch(head)
    before = predict(model, x, mask)
    after = predict(model, reverse_real_frames(x, mask), mask)
    np.testing.assert_allclose(after[0], before[0], rtol=1e-5, atol=1e-6)  # 1 real frame: same clip
    for i in range(1, len(LENGTHS)):
        assert not np.allclose(after[i], before[i], rtol=1e-4, atol=1e-6), f"{head} ignores frame order (clip {i})"


def test_reversing_real_frames_leaves_mean_head_unchanged(built):
    model = built["mean"]
    x, mask = make_batch("mean")
    before = predict(model, x, mask)
    np.testing.assert_allclose(predict(model, reverse_real_frames(x, mask), mask), before, rtol=1e-5, atol=1e-6)


def test_masked_average_ignores_padded_steps_and_handles_empty_clips():
    x = np.array([[[1.0, 2.0], [3.0, 4.0], [np.nan, 1e9]], [[5.0, 5.0], [7.0, 9.0], [0.0, 0.0]]], "float32")
    mask = np.array([[True, True, False], [False, False, False]])
    out = np.asarray(MaskedAverage()(x, mask=mask))
    np.testing.assert_allclose(out, [[2.0, 3.0], [0.0, 0.0]])


def test_masked_attention_pooling_gives_padded_steps_zero_weight():
    values = np.array([[[1.0, 0.0], [0.0, 1.0], [np.nan, 1e9]]], "float32")
    scores = np.array([[[0.0], [np.log(3.0)], [1e9]]], "float32")  # padded step has a huge score
    mask = np.array([[True, True, False]])
    out = np.asarray(MaskedAttentionPooling()(values, scores, mask=mask))
    np.testing.assert_allclose(out, [[0.25, 0.75]], rtol=1e-6)


def test_positional_encoding_is_sinusoidal_and_independent_of_length():
    layer = SinusoidalPositionEncoding()
    zeros = np.zeros((1, 7, 6), "float32")
    pe = np.asarray(layer(zeros))[0]
    pos = np.arange(7)[:, None]
    i = np.arange(6)[None, :]
    angles = pos / np.power(10000.0, (2 * (i // 2)) / 6)
    expected = np.where(i % 2 == 0, np.sin(angles), np.cos(angles))
    np.testing.assert_allclose(pe, expected, rtol=1e-5, atol=1e-6)
    longer = np.asarray(layer(np.zeros((1, 50, 6), "float32")))[0]  # no maximum length
    np.testing.assert_allclose(longer[:7], pe, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Standardisation
# ------------------------------------------------------------------------------------------


def test_normalization_layer_carries_train_mean_and_variance():
    rng = np.random.default_rng(3)
    data = (rng.normal(size=(500, D)) * rng.uniform(0.5, 5.0, size=D) + rng.normal(size=D) * 10).astype("float32")
    mean, variance = data.mean(axis=0), data.var(axis=0)
    model = build_head(HeadConfig(head="gru", units=8), (D,), N_CLASSES, mean=mean, variance=variance)
    norm = model.get_layer("standardize")
    assert isinstance(norm, keras.layers.Normalization)
    np.testing.assert_allclose(np.ravel(keras.ops.convert_to_numpy(norm.mean)), mean, rtol=1e-6)
    np.testing.assert_allclose(np.ravel(keras.ops.convert_to_numpy(norm.variance)), variance, rtol=1e-6)
    out = np.asarray(norm(data[None]))[0]
    np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(out.std(axis=0), 1.0, atol=1e-3)


def test_no_normalization_layer_without_stats():
    model = build_head(HeadConfig(head="mean", units=8), (D,), N_CLASSES)
    assert not any(isinstance(layer, keras.layers.Normalization) for layer in model.layers)


def test_zero_variance_feature_does_not_produce_nan():
    mean = np.zeros(D, "float32")
    variance = np.ones(D, "float32")
    variance[0] = 0.0  # a constant feature in the train split
    model = build_head(HeadConfig(head="gru", units=8), (D,), N_CLASSES, mean=mean, variance=variance)
    x, mask = make_batch("gru")
    assert np.all(np.isfinite(predict(model, x, mask)))


# ------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_save_and_load_in_safe_mode_gives_identical_predictions(built, head, tmp_path):
    model = built[head]
    x, mask = make_batch(head)
    before = predict(model, x, mask)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)  # safe_mode=True by default: no Lambda layers allowed
    np.testing.assert_allclose(predict(loaded, x, mask), before, rtol=1e-6, atol=1e-7)
    if head != "cnn-lstm":
        np.testing.assert_allclose(
            np.ravel(keras.ops.convert_to_numpy(loaded.get_layer("standardize").mean)), stats(head)[0], rtol=1e-6
        )


# ------------------------------------------------------------------------------------------
# Training smoke test
# ------------------------------------------------------------------------------------------


def test_gru_learns_whether_feature_zero_rises_or_falls():
    rng = np.random.default_rng(0)
    n, t, d = 64, 8, 4
    y = np.arange(n) % 2
    lengths = rng.integers(3, t + 1, size=n)
    mask = np.arange(t)[None, :] < lengths[:, None]
    x = rng.normal(scale=0.1, size=(n, t, d)).astype("float32")
    ramp = np.linspace(-1.0, 1.0, t)
    x[:, :, 0] += np.where(y[:, None] == 1, ramp, -ramp)  # class 1: rising, class 0: falling
    x[~mask] = 0.0
    keras.utils.set_random_seed(0)
    model = build_head(HeadConfig(head="gru", units=16, dropout=0.1), (d,), 2)
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit({"features": x, "mask": mask}, y, batch_size=16, epochs=8, verbose=0)
    probs = model.predict({"features": x, "mask": mask}, verbose=0)
    assert (probs.argmax(axis=1) == y).mean() > 0.9


# ------------------------------------------------------------------------------------------
# Configuration and input validation
# ------------------------------------------------------------------------------------------


def test_head_config_round_trips_through_dict_and_json():
    config = HeadConfig(head="transformer", units=32, layers=2, dropout=0.1, num_heads=8)
    assert HeadConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert HeadConfig.from_dict({}) == HeadConfig()
    assert HeadConfig(head=" GRU ").head == "gru"


def test_unknown_head_lists_the_choices():
    with pytest.raises(FeatpipeError) as err:
        HeadConfig(head="rnn")
    for name in HEADS:
        assert name in str(err.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"units": 0},
        {"units": -3},
        {"units": 2.5},
        {"layers": 0},
        {"dropout": -0.1},
        {"dropout": 1.0},
        {"dropout": float("nan")},
        {"num_heads": 0},
        {"head": 3},
    ],
)
def test_invalid_config_raises_featpipe_error(kwargs):
    with pytest.raises(FeatpipeError):
        HeadConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"units": 0}, "units"), ({"dropout": 1.0}, "dropout"), ({"head": "rnn"}, "head"), ({"l2": -1.0}, "l2")],
)
def test_a_bad_head_config_is_an_option_error_naming_the_field(kwargs, field):
    with pytest.raises(OptionError) as err:
        HeadConfig(**kwargs)
    assert err.value.option == field


def test_from_dict_refuses_unknown_keys():
    with pytest.raises(FeatpipeError, match="allowed keys"):
        HeadConfig.from_dict({"head": "gru", "unit": 8})


def test_cnn_lstm_on_feature_vectors_names_the_raw_cache():
    with pytest.raises(FeatpipeError, match="--backbone raw --size 64"):
        build_head(HeadConfig(head="cnn-lstm"), (2048,), N_CLASSES)


@pytest.mark.parametrize("head", [h for h in HEADS if h != "cnn-lstm"])
def test_feature_heads_on_raw_frames_name_the_feature_cache(head):
    with pytest.raises(FeatpipeError, match="cnn-lstm") as err:
        build_head(HeadConfig(head=head), IMAGE, N_CLASSES)
    assert "--backbone" in str(err.value)


@pytest.mark.parametrize(
    "head, shape, n_classes, mean, variance",
    [
        ("gru", (D,), 1, None, None),  # one class
        ("gru", (D,), N_CLASSES, np.zeros(D), None),  # mean without variance
        ("gru", (D,), N_CLASSES, np.zeros(D + 1), np.ones(D + 1)),  # wrong stats size
        ("gru", (D,), N_CLASSES, np.zeros(D), -np.ones(D)),  # negative variance
        ("gru", (D,), N_CLASSES, np.full(D, np.nan), np.ones(D)),  # NaN mean
        ("cnn-lstm", IMAGE, N_CLASSES, np.zeros(3), np.ones(3)),  # cnn-lstm rescales itself
        ("cnn-lstm", (4, 4, 3), N_CLASSES, None, None),  # frames too small for 3 poolings
        ("gru", (), N_CLASSES, None, None),  # empty feature shape
    ],
)
def test_bad_build_arguments_raise_featpipe_error(head, shape, n_classes, mean, variance):
    with pytest.raises(FeatpipeError):
        build_head(HeadConfig(head=head), shape, n_classes, mean=mean, variance=variance)


# ------------------------------------------------------------------------------------------
# segments head, frame subsets (temporal augmentation), pooled steps (issue 10)
# ------------------------------------------------------------------------------------------


def _segment_means_reference(x, n, k):
    out = np.zeros((k, x.shape[-1]))
    for i in range(k):
        lo, hi = i * n // k, max((i + 1) * n // k, min(i * n // k + 1, n))
        if hi > lo:
            out[i] = x[lo:hi].mean(axis=0)
    return out


def test_segment_means_average_real_frames_only_and_short_clips_repeat_frames_without_nan():
    lengths = (0, 1, 3, 4, 7, 10)
    x, mask = make_batch("gru", lengths=lengths, t=10)
    x[~mask] = np.nan  # garbage at padded steps must not reach any segment
    out = np.asarray(SegmentMeans(4)(x, mask=mask))
    assert np.isfinite(out).all()
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(out[b], _segment_means_reference(x[b], n, 4), rtol=1e-5, atol=1e-6)
    assert np.array_equal(out[0], np.zeros_like(out[0])), "a clip without real frames gives zeros"
    np.testing.assert_allclose(out[1], np.repeat(x[1, :1], 4, axis=0), rtol=1e-6), "1 frame fills all 4 segments"


def test_segments_head_classifies_clips_shorter_than_its_segments_and_sees_order():
    model = make("segments", segments=6)
    x, mask = make_batch("segments", lengths=(1, 2, 5, 6))
    probs = predict(model, x, mask)
    assert np.isfinite(probs).all() and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    reversed_x = x.copy()
    reversed_x[3, :6] = x[3, :6][::-1]
    assert not np.allclose(predict(model, reversed_x, mask)[3], probs[3], atol=1e-6), "segments are order-aware"


@pytest.mark.parametrize("n", [1, 5, 8, 9, 17, 40])
def test_frame_subset_at_inference_takes_the_uniform_positions_of_the_real_frames(n):
    from featpipe.video.decode import sample_indices

    pos, keep = FrameSubset(8).positions(np.array([n]), training=False)
    pos, keep = np.asarray(pos)[0], np.asarray(keep)[0]
    expected = sample_indices(n, 8)
    assert keep.sum() == len(expected)
    np.testing.assert_array_equal(pos[keep], expected)


def test_frame_subset_when_training_draws_sorted_real_frames_one_per_segment_deterministic_per_seed():
    counts = np.array([40, 33, 9, 5])

    def draws(seed, epochs=4):
        layer = FrameSubset(8, seed=seed)
        return [tuple(map(np.asarray, layer.positions(counts, training=True))) for _ in range(epochs)]

    first = draws(3)
    for pos, keep in first:
        for b, n in enumerate(counts):
            p = pos[b][keep[b]]
            assert len(p) == min(n, 8) and np.all(np.diff(p) > 0) and p.max() < n, "sorted, distinct, real"
            if n > 8:
                seg = np.arange(8)
                assert np.all((p >= seg * n // 8) & (p < (seg + 1) * n // 8)), "one frame per segment"
    assert len({pos.tobytes() for pos, _ in first}) > 1, "a new subset at each draw"
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(first, draws(3))), "the same seed draws the same subsets"
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first, draws(4)))


def test_a_model_with_frame_subsets_ignores_unselected_frames_at_inference_and_saves(tmp_path):
    model = make("gru", frames=4)
    x, mask = make_batch("gru", lengths=(7, 3), t=7)
    before = predict(model, x, mask)
    changed = x.copy()
    changed[0, [1, 3, 5]] += 100.0  # uniform positions of 7 frames among 4: 0, 2, 4, 6
    np.testing.assert_allclose(predict(model, changed, mask), before, rtol=1e-5, atol=1e-6)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(predict(loaded, x, mask), before, rtol=1e-5, atol=1e-6)


def test_pooled_steps_keep_recurrent_heads_order_aware_and_mask_safe():
    model = make("lstm", pooled_steps=3, bottleneck=5, input_dropout=0.2)
    x, mask = make_batch("lstm", lengths=(1, 6, 4))
    probs = predict(model, x, mask)
    garbage = x.copy()
    garbage[~mask] = 1e6
    np.testing.assert_allclose(predict(model, garbage, mask), probs, rtol=1e-5, atol=1e-6)
    reversed_x = x.copy()
    reversed_x[1] = x[1][::-1]
    assert not np.allclose(predict(model, reversed_x, mask)[1], probs[1], atol=1e-6)


def test_pca_projection_is_frozen_inside_the_model_and_required_when_asked_for():
    rng = np.random.default_rng(0)
    projection = rng.normal(size=(D, 4)).astype("float32")
    model = build_head(HeadConfig(head="gru", units=4, pca=4), (D,), N_CLASSES, *stats("gru"), pca=projection)
    layer = model.get_layer("pca")
    assert not layer.trainable and np.allclose(layer.get_weights()[0], projection)
    with pytest.raises(FeatpipeError, match="pca=4 needs a"):
        build_head(HeadConfig(head="gru", units=4, pca=4), (D,), N_CLASSES, *stats("gru"))


def test_segment_shortcut_beside_the_recurrent_state_is_mask_safe_and_loads_in_safe_mode(tmp_path):
    model = make("gru", shortcut=4, bottleneck=6, input_dropout=0.2)
    assert model.get_layer("shortcut_means").segments == 4
    x, mask = make_batch("gru")
    probs = predict(model, x, mask)
    garbage = x.copy()
    garbage[~mask] = np.nan
    np.testing.assert_allclose(predict(model, garbage, mask), probs, rtol=1e-5, atol=1e-6)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_allclose(predict(loaded, x, mask), probs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shortcut", [1, 2])  # 12 or 24 dimensions for 18 clips: fitted directly, or in their span
def test_fit_shortcut_makes_a_fresh_recurrent_head_the_logistic_regression_of_its_segment_means(tmp_path, shortcut):
    from sklearn.linear_model import LogisticRegression

    from featpipe.training.baselines import segment_means

    model = make("gru", shortcut=shortcut, bottleneck=4)
    lengths = (1, 2, 3, 4, 5, 6) * 3
    x, mask = make_batch("gru", lengths=lengths, seed=3)
    labels = np.arange(len(lengths)) % N_CLASSES
    assert fit_shortcut(model, [(x[:7], mask[:7]), (x[7:], mask[7:])], labels)
    assert not model.get_layer("shortcut_logits").trainable and model.get_layer("recurrent_logits").trainable
    mean, variance = stats("gru")
    z = np.where(mask[..., None], (x - mean) / np.sqrt(variance), 0.0)
    design = segment_means(z, mask, shortcut).reshape(len(x), -1)
    exact = LogisticRegression(C=SHORTCUT_C, max_iter=10_000, tol=1e-10).fit(design, labels)
    expected = exact.predict_proba(design)
    np.testing.assert_allclose(predict(model, x, mask), expected, atol=2e-3)  # lbfgs stops at tol 1e-4
    model.save(tmp_path / "m.keras")  # the fitted shortcut is part of the model file
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_allclose(predict(loaded, x, mask), predict(model, x, mask), atol=1e-6)
    assert not fit_shortcut(make("segments"), [(x, mask)], labels), "only recurrent heads have a shortcut"


def test_l2_penalises_the_classifier_weights_only_and_is_saved_with_the_model(tmp_path):
    assert not make("segments").losses, "no penalty unless asked for"
    model = make("segments", l2=0.1)
    kernel = np.asarray(model.get_layer("probabilities").kernel)
    assert len(model.losses) == 1
    assert float(model.losses[0]) == pytest.approx(0.1 * float(np.square(kernel).sum()), rel=1e-5)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    assert loaded.get_layer("probabilities").kernel_regularizer.l2 == pytest.approx(0.1)
    for bad in (-0.1, float("nan"), "0.1", True):
        with pytest.raises(FeatpipeError, match="l2 must be a number"):
            HeadConfig(head="gru", l2=bad)


def test_every_head_is_one_entry_the_cli_and_readme_offer():
    from pathlib import Path

    from typer.testing import CliRunner

    from featpipe.cli import app
    from featpipe.names import HEAD_NAMES

    assert tuple(HEADS) == HEAD_NAMES
    refused = CliRunner().invoke(app, ["train", "--head", "no-such-head"])
    assert refused.exit_code == 2
    for name in HEADS:  # the CLI's choices are the mapping's names
        assert name in refused.output
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in HEADS:
        assert f"`{name}`" in readme, f"README does not describe the {name} head"
