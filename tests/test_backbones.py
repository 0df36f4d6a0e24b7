"""Backbone registry: every entry builds, preprocesses its own way, and is deterministic."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from featpipe.backbones.frame_source import FeatureExtractor, activation_bytes_per_frame, auto_batch_size
from featpipe.backbones.registry import REGISTRY, Backbone, get_backbone, register_backbone
from featpipe.backbones.weights import build_model, fingerprint, weights_label
from featpipe.errors import BackboneError

SMALL = {name: (64 if name.startswith("efficientnet") else max(b.min_size, 32)) for name, b in REGISTRY.items()}
CNNS = sorted(name for name, b in REGISTRY.items() if not b.raw and not b.extra)  # keras-hub ones: test_hub.py


@pytest.mark.slow
@pytest.mark.parametrize("name", CNNS)
def test_every_backbone_gives_finite_features_of_its_declared_dimension(name):
    b = REGISTRY[name]
    extractor = FeatureExtractor(b, SMALL[name], weights="none", seed=0, batch_size=4)
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (3, SMALL[name], SMALL[name], 3), dtype=np.uint8)
    feats = extractor(frames)
    assert feats.shape == (3, b.feature_dim)
    assert np.isfinite(feats.astype(np.float16)).all(), "features must survive float16 storage"
    # different inputs give different features: the random network is not degenerate
    assert np.abs(feats[0] - feats[1]).max() > 1e-3 * (np.abs(feats).max() + 1e-12)


@pytest.mark.parametrize("name", ["vgg16", "efficientnetb0"])
def test_feature_dimension_is_what_keras_applications_pools(name):
    """Checked against the network keras.applications builds (random weights, small input), not copied literals."""
    b = REGISTRY[name]
    net = b.build(None, (b.min_size, b.min_size, 3))
    assert net.output_shape == (None, b.feature_dim)
    assert b.min_size <= b.default_size


def test_importing_the_registry_does_not_import_keras():
    code = (
        "import sys, featpipe.backbones.registry; "
        "print(','.join(m for m in ('keras', 'tensorflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_every_entry_pickles_without_importing_keras():
    """Entries travel to worker processes (the Ray engine's actors) as they are."""
    code = (
        "import pickle, sys; from featpipe.backbones.registry import REGISTRY; "
        "assert repr(pickle.loads(pickle.dumps(REGISTRY))) == repr(REGISTRY); "
        "print(','.join(m for m in ('keras', 'tensorflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _two_layer_build(weights, input_shape):
    import keras

    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))


def test_register_backbone_adds_one_entry_that_the_extractor_uses():
    entry = Backbone(
        "twolayer",
        build=_two_layer_build,
        preprocess_input=lambda x: x - 128.0,
        default_size=16,
        feature_dim=4,
        min_size=8,
    )
    try:
        assert register_backbone(entry) is entry and get_backbone("TwoLayer") is entry
        assert register_backbone(entry) is entry, "registering the same entry again is harmless"
        with pytest.raises(BackboneError, match="already registered.*replace=True"):
            register_backbone(Backbone("twolayer", _two_layer_build, lambda x: x, 16, 4))
        ex = FeatureExtractor("twolayer", weights="none", batch_size=2)
        frames = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
        direct = np.asarray(build_model(entry, 16, "none").predict_on_batch(entry.preprocess(frames)))
        np.testing.assert_allclose(ex(frames), direct, rtol=1e-4, atol=1e-5)
        assert ex.feature_shape == (4,) and ex.size == 16
    finally:
        REGISTRY.pop("twolayer", None)


def test_an_entry_without_a_builder_or_preprocessing_is_refused():
    with pytest.raises(BackboneError, match="build function and a preprocess_input"):
        Backbone("half", build=_two_layer_build, preprocess_input=None, default_size=16, feature_dim=4)
    with pytest.raises(BackboneError, match="lower case"):
        register_backbone(Backbone("Upper", _two_layer_build, lambda x: x, 16, 4))


def test_weights_errors_name_the_backbone(tmp_path):
    with pytest.raises(BackboneError, match="Keras weights file for vgg16"):
        build_model(get_backbone("vgg16"), 32, str(tmp_path / "nope.h5"))


def test_raw_entry_stores_the_frames_themselves_as_uint8():
    ex = FeatureExtractor("raw", 16, batch_size=4)
    frames = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(ex(frames), frames)
    assert ex.feature_shape == (16, 16, 3) and ex.storage_dtype == "uint8" and ex.weights == "none"
    assert ex.fingerprint == "raw-frames"


def test_each_backbone_uses_its_own_preprocessing():
    white = np.full((1, 2, 2, 3), 255, np.uint8)
    black = np.zeros((1, 2, 2, 3), np.uint8)
    inc = get_backbone("inceptionv3")
    assert np.allclose(inc.preprocess(white), 1.0) and np.allclose(inc.preprocess(black), -1.0)
    eff = get_backbone("efficientnetb0")  # rescaling is inside the model: raw [0, 255]
    assert np.allclose(eff.preprocess(white), 255.0)
    vgg = get_backbone("vgg16")  # caffe style: BGR, ImageNet mean subtracted
    red = np.zeros((1, 1, 1, 3), np.uint8)
    red[..., 0] = 255
    out = vgg.preprocess(red)[0, 0, 0]
    assert out[2] == pytest.approx(255 - 123.68, abs=1e-3) and out[0] == pytest.approx(-103.939, abs=1e-3)


def test_preprocess_does_not_modify_the_callers_frames():
    frames = np.full((1, 4, 4, 3), 200, np.uint8)
    get_backbone("inceptionv3").preprocess(frames)
    assert (frames == 200).all()


def test_random_weights_are_the_same_for_the_same_seed_and_differ_for_another():
    b = get_backbone("resnet50")
    a1 = fingerprint(build_model(b, 32, "none", seed=3))
    a2 = fingerprint(build_model(b, 32, "none", seed=3))
    other = fingerprint(build_model(b, 32, "none", seed=4))
    assert a1 == a2
    assert a1 != other


@pytest.mark.slow
def test_random_weights_are_the_same_in_a_fresh_process():
    code = (
        "from featpipe.backbones.registry import get_backbone; "
        "from featpipe.backbones.weights import build_model, fingerprint;"
        "print(fingerprint(build_model(get_backbone('vgg16'), 32, 'none', seed=7)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    here = fingerprint(build_model(get_backbone("vgg16"), 32, "none", seed=7))
    assert out.splitlines()[-1] == here


@pytest.mark.slow
def test_random_weights_do_not_depend_on_the_blas_thread_count():
    """Ray starts its workers with OMP_NUM_THREADS=1: their network must be the driver's, whatever its cores."""
    code = (
        "from featpipe.backbones.registry import get_backbone; "
        "from featpipe.backbones.weights import build_model, fingerprint;"
        "print(fingerprint(build_model(get_backbone('resnet50'), 32, 'none', seed=0)))"
    )
    prints = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "OPENBLAS_NUM_THREADS": n, "OMP_NUM_THREADS": n},
        )
        .stdout.strip()
        .splitlines()[-1]
        for n in ("1", "2")
    }
    assert len(prints) == 1, prints


def test_the_none_network_is_calibrated_in_numpy_not_on_the_backend(monkeypatch):
    """Batch-norm statistics computed by a backend's convolutions differ in the last bits from one
    backend to another (another fingerprint: a TensorFlow cache refused under PyTorch); computed in
    NumPy they are the same bytes under every backend. The backend's forward pass must not run."""
    import keras

    def no_backend_forward(self, *args, **kwargs):
        raise AssertionError("the calibration ran the network on the Keras backend")

    monkeypatch.setattr(keras.Model, "__call__", no_backend_forward)
    model = build_model(get_backbone("efficientnetb0"), 32, "none", seed=0)
    monkeypatch.undo()
    variances = [
        np.asarray(layer.moving_variance)
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert variances and not any(np.allclose(v, 1.0) for v in variances), "every batch norm was calibrated"


@pytest.mark.parametrize("name, size", [("efficientnetb0", 32), ("inceptionv3", 75)])
def test_the_numpy_forward_pass_computes_what_the_backend_computes(name, size):
    """The NumPy pass that calibrates `none` networks is the same network as Keras runs (padding,
    pooling, squeeze-excite, normalization), so the statistics it stores fit what inference sees."""
    import keras

    from featpipe.backbones.calibration import _calibration_images, _np_layer

    b = get_backbone(name)
    model = build_model(b, size, "none", seed=0)
    x = b.preprocess(_calibration_images(4, size, seed=9))

    def inference(layer):
        if isinstance(layer, keras.layers.BatchNormalization):  # inference mode: the stored statistics
            mean, var = (np.asarray(keras.ops.convert_to_numpy(v)) for v in (layer.moving_mean, layer.moving_variance))
            gamma = np.asarray(keras.ops.convert_to_numpy(layer.gamma)) if layer.scale else 1.0
            beta = np.asarray(keras.ops.convert_to_numpy(layer.beta)) if layer.center else 0.0
            return lambda v: (v - mean) / np.sqrt(var + layer.epsilon) * gamma + beta
        return _np_layer(layer, {})

    ours = model._run_through_graph(x, operation_fn=inference, call_fn=lambda fn, *a, **k: fn(*a))
    theirs = np.asarray(model.predict(x, verbose=0))
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-3, atol=1e-3 * np.abs(theirs).max())
    assert theirs.std() > 0.1, "calibrated features keep a usable scale"


def test_integer_weights_hash_alike_whatever_their_width():
    """EfficientNet's Normalization keeps a sample count: int64 under TensorFlow, int32 under
    PyTorch and JAX. The fingerprint must not tell the backends apart by it."""

    class Weights:
        def __init__(self, *arrays):
            self.arrays = arrays

        def get_weights(self):
            return list(self.arrays)

    kernel = np.ones((3, 3), np.float32)
    assert fingerprint(Weights(kernel, np.int64(0))) == fingerprint(Weights(kernel, np.int32(0)))
    assert fingerprint(Weights(kernel, np.int64(0))) != fingerprint(Weights(kernel, np.int64(1)))


def test_local_weights_file_is_loaded_and_fingerprinted(tmp_path):
    b = get_backbone("vgg16")
    source = build_model(b, 32, "none", seed=11)
    path = tmp_path / "vgg16_notop.weights.h5"
    source.save_weights(path)
    loaded = build_model(b, 32, str(path))
    assert fingerprint(loaded) == fingerprint(source)
    assert weights_label(str(path)) == str(path.resolve())


def test_missing_weights_file_names_the_alternatives(tmp_path):
    with pytest.raises(BackboneError, match="does not exist.*imagenet.*none"):
        build_model(get_backbone("vgg16"), 32, str(tmp_path / "nope.h5"))


def test_wrong_weights_file_is_one_clear_error(tmp_path):
    other = build_model(get_backbone("resnet50"), 32, "none")
    path = tmp_path / "resnet.weights.h5"
    other.save_weights(path)
    with pytest.raises(BackboneError, match="Could not load weights"):
        build_model(get_backbone("vgg16"), 32, str(path))


def test_failed_imagenet_download_says_so_and_names_both_alternatives(monkeypatch):
    import keras

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://example.invalid: None -- [Errno -3] Temporary failure")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    monkeypatch.setattr("keras.src.applications.vgg16.file_utils.get_file", offline, raising=False)
    with pytest.raises(BackboneError, match="ImageNet weights.*--weights PATH.*--weights none"):
        build_model(get_backbone("vgg16"), 32, "imagenet")


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(BackboneError, match="Unknown backbone 'alexnet'.*inceptionv3.*resnet50"):
        get_backbone("alexnet")


def test_too_small_input_size_is_refused_with_the_minimum():
    with pytest.raises(BackboneError, match="at least 75"):
        FeatureExtractor("inceptionv3", 64, weights="none")


def test_batches_are_padded_to_one_shape_so_results_do_not_depend_on_batch_fill():
    ex = FeatureExtractor("vgg16", 32, weights="none", batch_size=8)
    frames = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    full = ex(frames)
    alone = ex(frames[:1])
    np.testing.assert_array_equal(full[:1], alone)


def test_mixed_precision_keeps_the_weights_fingerprint_and_nearly_the_features():
    frames = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    full = FeatureExtractor("vgg16", 32, weights="none", batch_size=4)
    mixed = FeatureExtractor("vgg16", 32, weights="none", batch_size=4, precision="mixed_bfloat16")
    assert mixed.fingerprint == full.fingerprint
    a, b = full(frames), mixed(frames)
    assert b.dtype == np.float32
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()


def test_an_unknown_precision_names_the_choices():
    with pytest.raises(BackboneError, match="mixed_float16, mixed_bfloat16"):
        FeatureExtractor("vgg16", 32, weights="none", precision="fp8")


def test_preprocessing_runs_inside_the_inference_graph_and_matches_the_numpy_path():
    """uint8 frames go to the device; the backbone's own preprocess_input runs in the graph."""
    b = get_backbone("inceptionv3")
    ex = FeatureExtractor(b, 75, weights="none", batch_size=2)
    frames = np.random.default_rng(3).integers(0, 256, (2, 75, 75, 3), dtype=np.uint8)
    net = build_model(b, 75, "none", seed=0)
    direct = np.asarray(net.predict_on_batch(b.preprocess(frames)))
    # the same arithmetic up to float32 rounding (kernels may sum in another order)
    assert np.abs(ex(frames) - direct).max() < 1e-3 * np.abs(direct).max()


class _FakeDevice:
    def __init__(self, free_gib: float):
        self.kind, self.name, self.accelerator = "gpu", "fake", True
        self.total_bytes = self.free_bytes = int(free_gib * 2**30)


def test_batch_size_is_sized_from_the_devices_free_memory():
    model = build_model(get_backbone("vgg16"), 32, "none")
    per_frame = activation_bytes_per_frame(model) / 2
    from featpipe.runtime.devices import CPU

    assert auto_batch_size(model, CPU) == 32
    sizes = [auto_batch_size(model, _FakeDevice(per_frame * n / 0.5 / 2**30)) for n in (3, 20, 100, 10**6)]
    assert sizes == [8, 16, 64, 256], "largest power of two that fits half the free memory, within 8..256"
    assert auto_batch_size(model, _FakeDevice(per_frame * 20 / 0.5 / 2**30), "mixed_float16") == 32


def test_out_of_memory_halves_the_device_calls_and_keeps_the_results():
    ex = FeatureExtractor("vgg16", 32, weights="none", batch_size=None)  # batch size chosen: 32 on this CPU
    frames = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    expected = ex(frames)
    real = ex.model.predict_on_batch
    shapes = []

    def small_device(batch):
        shapes.append(len(batch))
        if len(batch) > 8:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
        return real(batch)

    ex.model.predict_on_batch = small_device
    got = ex(frames)
    assert np.abs(got - expected).max() < 1e-4 * np.abs(expected).max()  # float32 rounding of other batch sizes
    assert set(shapes[-3:]) == {8}, "the calls shrank to a size that fits"


def test_out_of_memory_with_an_explicit_batch_size_is_not_hidden():
    ex = FeatureExtractor("vgg16", 32, weights="none", batch_size=16)

    def full_device(batch):
        raise RuntimeError("CUDA out of memory")

    ex.model.predict_on_batch = full_device
    with pytest.raises(RuntimeError, match="out of memory"):
        ex(np.zeros((4, 32, 32, 3), np.uint8))


def test_a_compiler_failure_falls_back_to_uncompiled_inference_with_a_warning():
    ex = FeatureExtractor("vgg16", 32, weights="none", batch_size=4)
    frames = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    expected = ex(frames)
    ex.jit_compile = True  # as on a GPU
    real = ex.model.predict_on_batch

    def compiled_then_plain(batch):
        if ex.model.jit_compile:  # what the backend's compiler would choke on
            raise RuntimeError("compiler: unsupported operation")
        return real(batch)

    ex.model.jit_compile = True
    ex.model.predict_on_batch = compiled_then_plain
    with pytest.warns(RuntimeWarning, match="running uncompiled"):
        got = ex(frames)
    assert ex.jit_compile is False and not ex.model.jit_compile
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
