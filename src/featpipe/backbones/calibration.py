"""The NumPy calibration of random (``--weights none``) networks: the same bytes under every Keras backend.

:func:`deterministic_init` gives a network built without weights values that depend on a seed
alone; its batch-norm statistics come from a forward pass computed here, in NumPy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from featpipe.errors import BackboneError

if TYPE_CHECKING:
    from featpipe.backbones.registry import Backbone


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


def deterministic_init(model, backbone: Backbone, size: int, seed: int) -> None:
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
