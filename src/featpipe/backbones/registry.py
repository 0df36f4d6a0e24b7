"""Registry of frozen ImageNet backbones.

Each entry carries everything that must travel together: how to build the network (``build``),
the backbone's OWN ``preprocess_input`` (InceptionV3 scales to [-1, 1], EfficientNet takes raw
[0, 255] because rescaling is inside the model, VGG16/ResNet50 subtract ImageNet means in
BGR), the native input size and the feature dimension. Nothing applies one generic
normalisation to all backbones, and nothing outside an entry knows where its network comes
from: a backbone from keras_hub, or a network of your own, is one entry::

    from featpipe.backbones.registry import Backbone, register_backbone

    register_backbone(Backbone("tiny", build=my_build, preprocess_input=my_preprocess,
                               default_size=64, feature_dim=16))

``build(weights, input_shape)`` returns the pooled, top-less network (``weights`` is None or
"imagenet"; a weights file is loaded into a ``build(None, ...)`` network by :func:`build_model`);
``preprocess_input(x)`` takes float32 RGB in [0, 255], a NumPy array or a Keras tensor (it also
runs inside the inference graph). The ``keras.applications`` entries get both from
:class:`KerasApplication`.

Weights:
  * ``imagenet``: Keras downloads them once into ~/.keras/models;
  * ``none``: a random network that is DETERMINISTIC for a given seed, in every process
    (so a resumed extraction never mixes two networks);
  * a path to a local weights file (for machines without internet).
A fingerprint of the weight values is recorded in the cache so that mismatches are detected.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from featpipe.errors import BackboneError
from featpipe.names import PRECISIONS  # noqa: F401  re-exported
from featpipe.runtime.devices import current_device
from featpipe.runtime.keras_import import import_keras

WEIGHTS_IMAGENET = "imagenet"
WEIGHTS_NONE = "none"


@dataclass(frozen=True)
class KerasApplication:
    """A ``keras.applications`` network: ``module`` (e.g. "inception_v3") holds ``constructor``
    (e.g. "InceptionV3") and its ``preprocess_input``. Keras is imported only when one is called,
    and an instance (or its bound methods) pickles, so entries travel to worker processes."""

    module: str
    constructor: str

    def _module(self):
        return getattr(import_keras().applications, self.module)

    def build(self, weights: str | None, input_shape: tuple[int, int, int]):
        """The top-less network with global average pooling; ``weights`` None or "imagenet"."""
        constructor = getattr(self._module(), self.constructor)
        return constructor(weights=weights, include_top=False, pooling="avg", input_shape=input_shape)

    def preprocess_input(self, x):
        return self._module().preprocess_input(x)


@dataclass(frozen=True)
class Backbone:
    """One registry entry: a name, the behaviour (``build``, ``preprocess_input``) and the sizes.

    ``build(weights, input_shape) -> keras.Model`` maps preprocessed ``(B, *input_shape)`` float32 to
    ``(B, feature_dim)``; ``weights`` is None (random: :func:`build_model` then gives it deterministic
    values) or "imagenet". ``preprocess_input(x)`` turns float32 RGB in [0, 255] into what the network
    expects, on a NumPy array and on a Keras tensor alike. The ``raw`` entry has neither.
    """

    name: str
    build: Callable[[str | None, tuple[int, int, int]], Any] | None
    preprocess_input: Callable[[Any], Any] | None
    default_size: int  # native input size (pixels, square)
    feature_dim: int  # length of the pooled feature vector
    min_size: int = 32  # smallest input the network accepts
    raw: bool = False  # True for the "raw" entry: no network, the frames themselves are stored

    def __post_init__(self):
        if not self.raw and (self.build is None or self.preprocess_input is None):
            raise BackboneError(f"Backbone '{self.name}' needs a build function and a preprocess_input.")

    def preprocess(self, frames: np.ndarray) -> np.ndarray:
        """uint8 RGB (B, H, W, 3) -> float32 input exactly as this backbone expects it."""
        x = np.asarray(frames, dtype=np.float32).copy()
        if self.raw:
            return x
        return np.asarray(self.preprocess_input(x), dtype=np.float32)


def _application(
    name: str, module: str, constructor: str, default_size: int, feature_dim: int, min_size: int = 32
) -> Backbone:
    app = KerasApplication(module, constructor)
    return Backbone(name, app.build, app.preprocess_input, default_size, feature_dim, min_size)


_EFFICIENTNET = {  # variant: (native size, feature dim), from keras.applications.efficientnet
    0: (224, 1280),
    1: (240, 1280),
    2: (260, 1408),
    3: (300, 1536),
    4: (380, 1792),
    5: (456, 2048),
    6: (528, 2304),
    7: (600, 2560),
}

REGISTRY: dict[str, Backbone] = {
    "inceptionv3": _application("inceptionv3", "inception_v3", "InceptionV3", 299, 2048, min_size=75),
    **{
        f"efficientnetb{i}": _application(f"efficientnetb{i}", "efficientnet", f"EfficientNetB{i}", size, dim)
        for i, (size, dim) in _EFFICIENTNET.items()
    },
    "vgg16": _application("vgg16", "vgg16", "VGG16", 224, 512),
    "resnet50": _application("resnet50", "resnet50", "ResNet50", 224, 2048),
    # Not a CNN: stores the sampled uint8 frames (size x size x 3) for end-to-end models (cnn-lstm).
    "raw": Backbone("raw", None, None, 64, 0, min_size=8, raw=True),
}
RAW_FINGERPRINT = "raw-frames"  # what the cache records as weights fingerprint for the raw entry


def register_backbone(backbone: Backbone, replace: bool = False) -> Backbone:
    """Add ``backbone`` to the registry under its (lower-case) name, so ``featpipe.extract(backbone=name)``
    and :class:`FeatureExtractor` find it. An existing name is refused unless ``replace`` is true.

    Register it in every process that extracts with it (the command line's ``--backbone`` choices
    are the built-in entries; with ``--engine ray`` the entry itself travels to the workers).
    """
    if not isinstance(backbone, Backbone):
        raise BackboneError(f"register_backbone takes a Backbone, got {backbone!r}.")
    key = backbone.name.strip().lower()
    if key != backbone.name:
        raise BackboneError(f"A backbone's name must be lower case without surrounding spaces, got '{backbone.name}'.")
    if key in REGISTRY and not replace and REGISTRY[key] != backbone:
        raise BackboneError(f"A backbone named '{key}' is already registered; pass replace=True to replace it.")
    REGISTRY[key] = backbone
    return backbone


def is_raw(name: str) -> bool:
    """True when ``name`` is a registry entry that stores the frames themselves (the ``raw`` entry)."""
    entry = REGISTRY.get(str(name).strip().lower())
    return entry is not None and entry.raw


def get_backbone(name: str) -> Backbone:
    """Look up a backbone by name (case-insensitive)."""
    key = name.strip().lower()
    if key not in REGISTRY:
        raise BackboneError(f"Unknown backbone '{name}'. Choose one of: {', '.join(REGISTRY)}.")
    return REGISTRY[key]


def check_size(backbone: Backbone, size: int) -> int:
    if size < backbone.min_size:
        raise BackboneError(
            f"--size {size} is too small for {backbone.name}: it needs at least {backbone.min_size} pixels "
            f"(native size {backbone.default_size})."
        )
    return size


def weights_label(weights: str | os.PathLike) -> str:
    """Normalise the --weights value to what the cache records: 'imagenet', 'none' or an absolute path."""
    text = str(weights)
    if text.lower() in (WEIGHTS_IMAGENET, WEIGHTS_NONE):
        return text.lower()
    return str(Path(text).expanduser().resolve())


def fingerprint(model) -> str:
    """A short hash of every weight value (shape, dtype and bytes) in model order.

    Integer variables (the sample count of EfficientNet's Normalization layer) are hashed as
    int64 whatever their dtype: TensorFlow keeps them as int64, PyTorch and JAX as int32, and
    the same network must have the same fingerprint under every backend.
    """
    digest = hashlib.sha256()
    for w in model.get_weights():
        a = np.ascontiguousarray(w)
        if a.dtype.kind in "iu":
            a = a.astype(np.int64)
        digest.update(str((a.shape, a.dtype.str)).encode())
        digest.update(a.tobytes())
    return digest.hexdigest()[:16]


def _calibration_images(n: int, size: int, seed: int) -> np.ndarray:
    """Deterministic synthetic images of mixed smoothness (flat, blotchy, noisy), uint8-range floats."""
    import cv2  # lazy: `import featpipe` does not load OpenCV (tests/test_datasets.py)

    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        grid = (1, 2, 4, 8, 16, size)[i % 6]
        low = rng.uniform(0, 255, (grid, grid, 3)).astype(np.float32)
        interp = cv2.INTER_NEAREST if grid in (1, size) else cv2.INTER_LINEAR
        images.append(cv2.resize(low, (size, size), interpolation=interp))
    return np.clip(np.stack(images), 0, 255)


def _deterministic_init(model, backbone: Backbone, size: int, seed: int) -> None:
    """Give a weights=None network values that depend on ``seed`` alone, with usable scale, and
    are the same bytes under every Keras backend (TensorFlow, PyTorch, JAX).

    Keras' default initialisers make the deep pooled features of these networks collapse to
    nearly constant values (and underflow float16), so instead: He-normal kernels drawn from a
    seeded NumPy generator in layer order, then batch-norm statistics calibrated over a
    deterministic synthetic batch so activations stay near unit scale. That calibration pass runs
    in NumPy (:func:`_numpy_calibration`), not on the backend: each backend's convolutions round
    differently, and statistics computed by them would differ in the last bits, giving another
    weights fingerprint, so a cache extracted under TensorFlow would be refused under PyTorch.
    For the same reason it runs with one BLAS thread: OpenBLAS splits a matrix product differently
    for another thread count, and the statistics then differ in the last bits too (a Ray actor,
    which Ray starts with OMP_NUM_THREADS=1, got another fingerprint than the driver on 2 cores).
    """
    from keras import layers
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, layers.DepthwiseConv2D):
            kernel = layer.kernel
            fan_in = kernel.shape[0] * kernel.shape[1]
        elif isinstance(layer, (layers.Conv2D, layers.Dense)):
            kernel = layer.kernel
            fan_in = int(np.prod(kernel.shape[:-1]))
        else:
            continue
        kernel.assign(rng.normal(0.0, np.sqrt(2.0 / fan_in), tuple(kernel.shape)).astype(np.float32))
    if any(isinstance(layer, layers.BatchNormalization) for layer in model._flatten_layers(include_self=False)):
        with threadpool_limits(limits=1, user_api="blas"):
            stats = _numpy_calibration(model, backbone.preprocess(_calibration_images(24, size, seed)))
        for layer, (mean, var) in stats.items():
            layer.moving_mean.assign(mean)
            layer.moving_variance.assign(var)


# ------------------------------------------------------------------ NumPy forward pass (calibration)
# Only what the registry's networks use (InceptionV3, EfficientNet, VGG16, ResNet50), channels last,
# TensorFlow's "same" padding (which Keras keeps on every backend). Batch norm runs in training mode:
# it normalises with the batch's own statistics (biased variance, as Keras computes them), which
# become the layer's moving statistics, exactly what `model(x, training=True)` with momentum 0 and
# dropout off stored before, up to the backend's rounding.

_IM2COL_BYTES = 128 << 20  # bound on the unfolded patches held at once


def _np_activation(fn, x: np.ndarray) -> np.ndarray:
    name = getattr(fn, "__name__", str(fn))
    if name in ("linear", "identity", "None"):
        return x
    if name == "relu":
        return np.maximum(x, 0, dtype=np.float32)
    if name in ("swish", "silu", "sigmoid"):
        with np.errstate(over="ignore"):  # exp(-x) overflows to inf for very negative x: sigmoid 0, right
            sig = 1.0 / (1.0 + np.exp(-x))
        return (x * sig if name != "sigmoid" else sig).astype(np.float32)
    raise BackboneError(f"featpipe cannot calibrate a network with the activation {name!r} (weights none).")


def _same_padding(n: int, k: int, s: int) -> tuple[int, int]:
    out = -(-n // s)
    total = max((out - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def _pad2d(x: np.ndarray, kh: int, kw: int, sh: int, sw: int, padding: str, value: float = 0.0) -> np.ndarray:
    if padding != "same":
        return x
    (top, bottom), (left, right) = _same_padding(x.shape[1], kh, sh), _same_padding(x.shape[2], kw, sw)
    if not (top or bottom or left or right):
        return x
    return np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=value)


def _taps(x: np.ndarray, kh: int, kw: int, sh: int, sw: int):
    """Yield (i, j, view): the input each kernel tap sees, for a VALID window of stride (sh, sw)."""
    oh, ow = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    for i in range(kh):
        for j in range(kw):
            yield i, j, x[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw]


def _np_conv(x: np.ndarray, kernel: np.ndarray, strides, padding: str, depthwise: bool = False) -> np.ndarray:
    kh, kw = kernel.shape[:2]
    sh, sw = strides
    x = _pad2d(x, kh, kw, sh, sw, padding)
    n, h, w, c = x.shape
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    if depthwise:
        k = kernel.reshape(kh, kw, -1)  # depth multiplier 1 in the registry's networks
        out = np.zeros((n, oh, ow, c), np.float32)
        for i, j, view in _taps(x, kh, kw, sh, sw):
            out += view * k[i, j]
        return out
    k2 = kernel.reshape(kh * kw * c, -1)
    out = np.empty((n, oh, ow, k2.shape[1]), np.float32)
    per_image = oh * ow * kh * kw * c * 4
    step = max(1, _IM2COL_BYTES // max(per_image, 1))
    for start in range(0, n, step):
        part = x[start : start + step]
        if kh == kw == 1:
            cols = np.ascontiguousarray(part[:, ::sh, ::sw][:, :oh, :ow])
        else:
            cols = np.empty((len(part), oh, ow, kh, kw, c), np.float32)
            for i, j, view in _taps(part, kh, kw, sh, sw):
                cols[:, :, :, i, j, :] = view
        out[start : start + step] = (cols.reshape(-1, k2.shape[0]) @ k2).reshape(len(part), oh, ow, -1)
    return out


def _np_pool(x: np.ndarray, pool, strides, padding: str, kind: str) -> np.ndarray:
    kh, kw = pool
    sh, sw = strides
    if kind == "max":
        xp = _pad2d(x, kh, kw, sh, sw, padding, value=-np.inf)
        out = None
        for _, _, view in _taps(xp, kh, kw, sh, sw):
            out = view.copy() if out is None else np.maximum(out, view, out=out)
        return out
    xp = _pad2d(x, kh, kw, sh, sw, padding)
    ones = _pad2d(np.ones((1, *x.shape[1:3], 1), np.float32), kh, kw, sh, sw, padding)
    total, count = None, None
    for (_, _, view), (_, _, valid) in zip(_taps(xp, kh, kw, sh, sw), _taps(ones, kh, kw, sh, sw)):
        total = view.astype(np.float32) if total is None else total + view
        count = valid.copy() if count is None else count + valid
    return (total / count).astype(np.float32)  # padding is not counted, as in TensorFlow


def _np_layer(layer, stats: dict):
    """A NumPy function computing ``layer`` (training-mode batch norm records into ``stats``)."""
    from keras import layers, ops

    name = type(layer).__name__
    w = [np.asarray(ops.convert_to_numpy(v), dtype=np.float32) for v in layer.weights]
    if isinstance(layer, layers.DepthwiseConv2D) or isinstance(layer, layers.Conv2D):
        depthwise = isinstance(layer, layers.DepthwiseConv2D)
        if tuple(layer.dilation_rate) != (1, 1) or getattr(layer, "groups", 1) != 1:
            raise BackboneError(f"featpipe cannot calibrate the layer {layer.name} (dilated or grouped convolution).")

        def conv(x):
            y = _np_conv(x, w[0], layer.strides, layer.padding, depthwise)
            if layer.use_bias:
                y += w[1].reshape(-1)
            return _np_activation(layer.activation, y)

        return conv
    if isinstance(layer, layers.BatchNormalization):
        gamma = np.asarray(ops.convert_to_numpy(layer.gamma), np.float32) if layer.scale else 1.0
        beta = np.asarray(ops.convert_to_numpy(layer.beta), np.float32) if layer.center else 0.0

        def batch_norm(x):
            x64 = x.astype(np.float64)
            mean = x64.mean(axis=(0, 1, 2))
            var = np.square(x64 - mean).mean(axis=(0, 1, 2))
            stats[layer] = (mean.astype(np.float32), var.astype(np.float32))
            return ((x64 - mean) / np.sqrt(var + layer.epsilon) * gamma + beta).astype(np.float32)

        return batch_norm
    if isinstance(layer, layers.Activation):
        return lambda x: _np_activation(layer.activation, x)
    if isinstance(layer, layers.ReLU) and layer.max_value is None and not layer.negative_slope and not layer.threshold:
        return lambda x: np.maximum(x, 0, dtype=np.float32)
    if isinstance(layer, layers.MaxPooling2D):
        return lambda x: _np_pool(x, layer.pool_size, layer.strides, layer.padding, "max")
    if isinstance(layer, layers.AveragePooling2D):
        return lambda x: _np_pool(x, layer.pool_size, layer.strides, layer.padding, "avg")
    if isinstance(layer, layers.GlobalAveragePooling2D):
        return lambda x: x.astype(np.float64).mean(axis=(1, 2), keepdims=bool(layer.keepdims)).astype(np.float32)
    if isinstance(layer, layers.ZeroPadding2D):
        (top, bottom), (left, right) = layer.padding
        return lambda x: np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    if isinstance(layer, layers.Rescaling):
        scale, offset = np.float32(layer.scale), np.float32(layer.offset)
        return lambda x: (x * scale + offset).astype(np.float32)
    if isinstance(layer, layers.Normalization) and not layer.invert:
        mean = np.asarray(ops.convert_to_numpy(layer.mean), np.float32)
        std = np.maximum(np.sqrt(np.asarray(ops.convert_to_numpy(layer.variance), np.float32)), 1e-7)
        return lambda x: ((x - mean) / std).astype(np.float32)
    if isinstance(layer, layers.Reshape):
        return lambda x: x.reshape((len(x), *layer.target_shape))
    if isinstance(layer, layers.Dropout):
        return lambda x: x  # off while calibrating (EfficientNet's drop-connect), as at inference
    if isinstance(layer, layers.Concatenate):
        return lambda xs: np.concatenate(xs, axis=layer.axis)
    if isinstance(layer, layers.Add):
        return lambda xs: np.sum(np.stack(xs), axis=0, dtype=np.float32)
    if isinstance(layer, layers.Multiply):

        def multiply(xs):
            out = xs[0]
            for x in xs[1:]:
                out = out * x
            return out.astype(np.float32)

        return multiply
    raise BackboneError(f"featpipe cannot calibrate a network with a {name} layer ({layer.name}) for --weights none.")


def _numpy_calibration(model, images: np.ndarray) -> dict:
    """``{batch-norm layer: (mean, variance)}`` from one training-mode forward pass of ``images``
    through ``model``, computed in NumPy: the same bytes whatever the Keras backend."""
    stats: dict = {}
    functions: dict = {}

    def operation_fn(layer):
        if layer not in functions:
            functions[layer] = _np_layer(layer, stats)
        return functions[layer]

    def call_fn(fn, *args, **kwargs):
        return fn(*args)

    model._run_through_graph(np.asarray(images, np.float32), operation_fn=operation_fn, call_fn=call_fn)
    return stats


def build_model(backbone: Backbone, size: int, weights: str = WEIGHTS_IMAGENET, seed: int = 0):
    """Build the frozen feature network: include_top=False, global average pooling.

    Returns a Keras model mapping preprocessed (B, size, size, 3) float32 to (B, feature_dim).
    """
    keras = import_keras()

    check_size(backbone, size)
    input_shape = (size, size, 3)
    label = weights_label(weights)
    if label == WEIGHTS_NONE:
        keras.utils.set_random_seed(seed)
        model = backbone.build(None, input_shape)
        _deterministic_init(model, backbone, size, seed)
    elif label == WEIGHTS_IMAGENET:
        try:
            model = backbone.build(WEIGHTS_IMAGENET, input_shape)
        except Exception as exc:  # keras.utils.get_file raises a plain Exception on fetch failure
            raise BackboneError(
                f"Could not load the ImageNet weights for {backbone.name} ({exc}). Without internet, "
                f"pass --weights PATH to a local Keras weights file (the '_notop' .h5 for {backbone.name}), "
                f"or --weights none for a deterministic random network."
            ) from exc
    else:
        path = Path(label)
        if not path.is_file():
            raise BackboneError(
                f"Weights file '{path}' does not exist. Pass --weights imagenet, --weights none, "
                f"or the path of a Keras weights file for {backbone.name} (include_top=False)."
            )
        model = backbone.build(None, input_shape)
        try:
            model.load_weights(str(path))
        except (ValueError, OSError, KeyError) as exc:
            raise BackboneError(
                f"Could not load weights from '{path}' into {backbone.name} without its top: {exc}. "
                f"Use the '_notop' weights file for this backbone."
            ) from exc
    model.trainable = False
    return model


_MAX_AUTO_BATCH = 256


def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise BackboneError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{precision}'.")
    return precision


def _inference_model(backbone: Backbone, size: int, model, precision: str, jit_compile):
    """Wrap the float32 feature network for inference: uint8 frames in, float32 features out.

    The backbone's own ``preprocess_input`` runs INSIDE the graph (on the device, after a
    uint8 transfer that is 4x smaller than float32), so the host thread only stacks frames.
    With a mixed precision the same architecture is rebuilt under that dtype policy and given
    the float32 network's weights, so the weights fingerprint never depends on the precision.
    """
    keras = import_keras()

    net = model
    if precision != "float32":
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(precision)
        try:
            net = backbone.build(None, (size, size, 3))
        finally:
            keras.config.set_dtype_policy(previous)
        net.set_weights(model.get_weights())
        net.trainable = False
    frames = keras.Input((size, size, 3), dtype="uint8", name="frames")
    x = backbone.preprocess_input(keras.ops.cast(frames, "float32"))
    features = keras.ops.cast(net(x, training=False), "float32")
    wrapped = keras.Model(frames, features, name=f"{backbone.name}_features")
    wrapped.compile(jit_compile=jit_compile)
    return wrapped


def _is_out_of_memory(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(s in text for s in ("out of memory", "outofmemory", "resource_exhausted", "resourceexhausted", "oom"))


class FeatureExtractor:
    """A frozen backbone that turns uint8 RGB frames into pooled features, batch by batch.

    Every call runs fixed-shape batches (``batch_size`` frames, zero-padded) so the compiled
    predict function is traced once. ``precision`` is the compute dtype policy of the backbone
    (features come back as float32 either way). Inference is compiled (XLA, jax.jit or
    torch.compile) on an accelerator, Keras' own choice on a CPU. If the device runs out of
    memory on a batch size that was not given explicitly, the batch is split in halves.
    """

    storage_dtype: str | None = None  # the dtype the cache must use whatever --dtype says (RawFrames: uint8)
    # every frame source sets it: True (compiled, an accelerator), "auto" (Keras decides, a CPU) or False
    jit_compile: bool | str

    def __new__(cls, backbone: Backbone | str, *args, **kwargs):
        """The registry decides the frame source: the ``raw`` entry is :class:`RawFrames`, the rest are networks."""
        entry = get_backbone(backbone) if isinstance(backbone, str) else backbone
        return super().__new__(RawFrames if cls is FeatureExtractor and entry.raw else cls)

    def __init__(
        self,
        backbone: Backbone | str,
        size: int | None = None,
        weights: str = WEIGHTS_IMAGENET,
        seed: int = 0,
        batch_size: int | None = 32,
        precision: str = "float32",
    ):
        self.backbone = get_backbone(backbone) if isinstance(backbone, str) else backbone
        self.size = check_size(self.backbone, size or self.backbone.default_size)
        self.weights = weights_label(weights)
        self.seed = seed
        self.precision = _check_precision(precision)
        self._auto_batch = batch_size is None
        model = build_model(self.backbone, self.size, self.weights, seed)
        self.fingerprint = fingerprint(model)
        self.feature_shape: tuple[int, ...] = (self.backbone.feature_dim,)
        device = current_device()
        self.batch_size = int(batch_size or auto_batch_size(model, device, self.precision))
        self.jit_compile = True if device.accelerator else "auto"
        self.model = _inference_model(self.backbone, self.size, model, self.precision, self.jit_compile)
        self._micro = self.batch_size  # frames per device call; halved on out-of-memory

    def cache_dtype(self, requested: str) -> str:
        """The dtype features are stored in: ``requested`` (--dtype) for a network."""
        return requested

    def warm_up(self) -> None:
        """Compile the forward pass now, as set-up, where that is worth it (an accelerator).

        On a CPU the first real batch traces it instead: a warm-up batch there costs a whole forward pass.
        """
        if self.jit_compile is True:
            self(np.zeros((1, self.size, self.size, 3), np.uint8))

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """(n, size, size, 3) uint8, n <= batch_size -> (n, *feature_shape) float32 features."""
        n = len(frames)
        if n > self.batch_size:
            raise ValueError(f"got {n} frames for a batch of {self.batch_size}")
        if n == 0:
            return np.zeros((0, *self.feature_shape), np.float32)
        if n == self.batch_size:  # the usual full batch: no padding copy on the hot path
            batch = np.ascontiguousarray(frames, dtype=np.uint8)
        else:
            batch = np.zeros((self.batch_size, self.size, self.size, 3), dtype=np.uint8)
            batch[:n] = frames
        while True:
            try:  # every call has the same shape (_micro divides batch_size), so one compiled trace
                parts = [self.model.predict_on_batch(batch[i : i + self._micro]) for i in range(0, n, self._micro)]
                break
            except Exception as exc:
                if self._auto_batch and self._micro > 1 and _is_out_of_memory(exc):
                    self._micro //= 2  # the device is fuller than estimated: smaller calls, same results
                elif self.jit_compile is True and not _is_out_of_memory(exc):
                    # a compiler that cannot handle this graph on this backend: same results, uncompiled
                    warnings.warn(
                        f"Compiled inference failed ({type(exc).__name__}: {exc}); running uncompiled.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    self.jit_compile = False
                    self.model.compile(jit_compile=False)
                else:
                    raise
        return np.concatenate([np.asarray(p, dtype=np.float32) for p in parts])[:n]


class RawFrames(FeatureExtractor):
    """The ``raw`` frame source: no network, a frame's "features" are its own uint8 pixels.

    ``FeatureExtractor("raw", size)`` builds one. It carries the same interface through the same
    stages (batch_size, feature_shape, fingerprint, ``__call__``), stores ``(size, size, 3)`` uint8
    whatever ``--dtype`` says, and has nothing to compile or warm up.
    """

    storage_dtype = "uint8"

    def __init__(
        self,
        backbone: Backbone | str = "raw",
        size: int | None = None,
        weights: str = WEIGHTS_NONE,
        seed: int = 0,
        batch_size: int | None = 32,
        precision: str = "float32",
    ):
        self.backbone = get_backbone(backbone) if isinstance(backbone, str) else backbone
        self.size = check_size(self.backbone, size or self.backbone.default_size)
        self.weights = WEIGHTS_NONE
        self.seed = seed
        self.precision = _check_precision(precision)
        self._auto_batch = False
        self.model = None
        self.jit_compile = False
        self.fingerprint = RAW_FINGERPRINT
        self.feature_shape = (self.size, self.size, 3)
        self.batch_size = self._micro = int(batch_size or 32)

    def cache_dtype(self, requested: str) -> str:
        return self.storage_dtype

    def warm_up(self) -> None:
        return None

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        if len(frames) > self.batch_size:
            raise ValueError(f"got {len(frames)} frames for a batch of {self.batch_size}")
        return np.asarray(frames)


def activation_bytes_per_frame(model) -> int:
    """Sum of every layer's output size for one frame, in float32 bytes: an upper bound on memory."""
    total = 0
    for layer in model.layers:
        outputs = layer.output if isinstance(layer.output, (list, tuple)) else [layer.output]
        total += sum(int(np.prod(o.shape[1:])) for o in outputs)
    return 4 * total


def auto_batch_size(model, device=None, precision: str = "float32") -> int:
    """Frames per forward pass when --batch-size is not given.

    CPU: 32. Accelerator: the largest power of two whose activations fit in half the free
    device memory, taking half the sum of all layer outputs per frame (frameworks reuse
    buffers; mixed precision halves them again), between 8 and 256.
    """
    device = device or current_device()
    if not device.accelerator:
        return 32
    if not device.free_bytes:
        return 128
    per_frame = activation_bytes_per_frame(model) / 2
    if precision != "float32":
        per_frame /= 2
    fits = int(device.free_bytes * 0.5 / max(per_frame, 1))
    size = 8
    while size * 2 <= min(fits, _MAX_AUTO_BATCH):
        size *= 2
    return size
