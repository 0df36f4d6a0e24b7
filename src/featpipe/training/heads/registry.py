"""The HEADS registry (name -> builder) and :func:`build_head`, which wraps a builder in the shared input
pipeline (frame subset, zeroed padding, standardisation, feature dropout, PCA or bottleneck) and the classifier.

A new head is one builder plus one entry in :data:`HEADS` and its name in featpipe.names.HEAD_NAMES (which the
CLI reads without importing Keras).
"""

from __future__ import annotations

import numbers

import numpy as np

from featpipe.errors import FeatpipeError
from featpipe.names import HEAD_NAMES, IMAGE_HEADS, RECURRENT_HEADS
from featpipe.runtime.keras_import import import_keras
from featpipe.training.heads.config import HeadConfig
from featpipe.training.heads.image import MIN_IMAGE_SIZE, cnn_frames, cnn_lstm_head
from featpipe.training.heads.layers import FrameSubset, SegmentMeans, ZeroPadded
from featpipe.training.heads.pooling import attention_head, mean_head, segments_head, transformer_head
from featpipe.training.heads.recurrent import bilstm, gru, lstm, recurrent_head

keras = import_keras()
layers = keras.layers

FEATURE_HEADS = tuple(h for h in HEAD_NAMES if h not in IMAGE_HEADS)

_FEATURE_CACHE_HINT = "a feature cache from `featpipe extract` with a CNN backbone (e.g. `--backbone resnet50`)"
_RAW_CACHE_HINT = "a raw-frame cache (`featpipe extract --backbone raw --size 64`)"


def _check_shape(config: HeadConfig, feature_shape, n_classes) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in feature_shape)
    except (TypeError, ValueError):
        raise FeatpipeError(f"feature_shape must be a tuple of positive integers; got {feature_shape!r}.") from None
    if not shape or any(d < 1 for d in shape):
        raise FeatpipeError(f"feature_shape must be a non-empty tuple of positive integers; got {feature_shape!r}.")
    if isinstance(n_classes, bool) or not isinstance(n_classes, numbers.Integral) or n_classes < 2:
        raise FeatpipeError(f"n_classes must be a whole number >= 2; got {n_classes!r}.")
    if config.head in IMAGE_HEADS:
        if len(shape) != 3:
            raise FeatpipeError(
                f"Head {config.head!r} classifies raw frames (H, W, channels) but this cache holds "
                f"feature vectors of shape {shape}; build {_RAW_CACHE_HINT} or pick a feature head "
                f"({', '.join(FEATURE_HEADS)})."
            )
        if min(shape[:2]) < MIN_IMAGE_SIZE:
            raise FeatpipeError(
                f"Head {config.head!r} needs frames of at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} pixels; "
                f"got {shape[0]}x{shape[1]}: re-extract with a larger `--size` (e.g. 64)."
            )
    elif len(shape) != 1:
        raise FeatpipeError(
            f"Head {config.head!r} classifies per-frame feature vectors but this cache holds arrays of "
            f"shape {shape}; use {_FEATURE_CACHE_HINT}, or the 'cnn-lstm' head for {_RAW_CACHE_HINT}."
        )
    return shape


def _check_stats(config: HeadConfig, shape, mean, variance):
    if mean is None and variance is None:
        return None, None
    if mean is None or variance is None:
        raise FeatpipeError("Pass both mean and variance (train-split statistics) to standardise features, or neither.")
    if config.head in IMAGE_HEADS:
        raise FeatpipeError(
            f"Head {config.head!r} rescales raw pixels by 1/255 itself; pass mean=None and variance=None."
        )
    stats = []
    for name, value in (("mean", mean), ("variance", variance)):
        arr = np.asarray(value, dtype=np.float32)
        if arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] != shape[-1]):
            raise FeatpipeError(
                f"{name} must be a scalar or have one value per feature ({shape[-1]}); got shape {arr.shape}."
            )
        if not np.all(np.isfinite(arr)):
            raise FeatpipeError(f"{name} contains NaN or inf: recompute it over the train split's real frames.")
        stats.append(arr)
    if np.any(stats[1] < 0):
        raise FeatpipeError("variance must be >= 0 everywhere: recompute it over the train split's real frames.")
    return stats[0], stats[1]


def build_head(
    config: HeadConfig,
    feature_shape: tuple[int, ...],
    n_classes: int,
    mean: np.ndarray | None = None,
    variance: np.ndarray | None = None,
    pca: np.ndarray | None = None,
    seed: int | None = None,
) -> keras.Model:
    """Build (uncompiled) the mask-aware classifier ``config.head``.

    Inputs ``{"features": (B, T, *feature_shape) float32, "mask": (B, T) bool}``, any T;
    output softmax probabilities ``(B, n_classes)``. For feature heads, ``mean``/``variance``
    (train split, real frames only) become a ``Normalization`` layer saved with the model, and
    ``pca`` (``(D, config.pca)``, from :func:`featpipe.training.inputs.pca_whitening` on the standardised train
    frames) a frozen projection saved with it too. ``seed`` seeds the training-time frame subsets
    of ``config.frames``.
    """
    if not isinstance(config, HeadConfig):
        raise FeatpipeError(f"config must be a featpipe.training.heads.config.HeadConfig; got {type(config).__name__}.")
    shape = _check_shape(config, feature_shape, n_classes)
    mean, variance = _check_stats(config, shape, mean, variance)

    features = keras.Input(shape=(None, *shape), dtype="float32", name="features")
    mask = keras.Input(shape=(None,), dtype="bool", name="mask")

    mask_input = mask
    x = features
    if config.frames:
        x, mask_used = FrameSubset(config.frames, seed=seed, name="frame_subset")(x, mask)
    else:
        mask_used = mask
    x = ZeroPadded(name="zero_padded")(x, mask=mask_used)
    if config.head in IMAGE_HEADS:
        x = cnn_frames(x, config)
    else:
        if mean is not None:
            x = layers.Normalization(mean=mean, variance=variance, name="standardize")(x)
        standardized = x
        if config.input_dropout:
            x = layers.Dropout(config.input_dropout, noise_shape=(None, 1, x.shape[-1]), name="feature_dropout")(x)
        if config.pca:
            if pca is None or np.shape(pca) != (shape[-1], config.pca):
                raise FeatpipeError(
                    f"pca={config.pca} needs a ({shape[-1]}, {config.pca}) projection fitted on the "
                    f"train frames; got {None if pca is None else np.shape(pca)}."
                )
            projection = layers.Dense(config.pca, use_bias=False, trainable=False, name="pca")
            x = projection(x)
            projection.set_weights([np.asarray(pca, dtype=np.float32)])
        elif config.bottleneck:
            x = layers.Dense(config.bottleneck, name="bottleneck")(x)
            x = layers.Dropout(config.dropout, name="bottleneck_dropout")(x)
    mask = mask_used

    head = config.head
    x = HEADS[head](x, mask, config)
    penalty = keras.regularizers.L2(config.l2) if config.l2 else None
    if head in RECURRENT_HEADS and config.shortcut:
        # A linear classifier of the segment means (TSN consensus) beside the recurrent state: frozen, fitted
        # by fit_shortcut() as a logistic regression before training; the recurrent branch's logits start at
        # zero and are added to it, so training learns what the segment means miss.
        short = SegmentMeans(config.shortcut, name="shortcut_means")(standardized, mask=mask_used)
        short = layers.Flatten(name="shortcut_flat")(short)
        short = layers.Dense(
            n_classes, kernel_initializer="zeros", trainable=False, dtype="float32", name="shortcut_logits"
        )(short)
        x = layers.Dense(
            n_classes, kernel_initializer="zeros", kernel_regularizer=penalty, dtype="float32", name="recurrent_logits"
        )(x)
        logits = layers.Add(dtype="float32", name="logits")([short, x])
        probabilities = layers.Activation("softmax", dtype="float32", name="probabilities")(logits)
    else:
        probabilities = layers.Dense(
            n_classes, activation="softmax", dtype="float32", kernel_regularizer=penalty, name="probabilities"
        )(x)
    name = "featpipe_" + head.replace("-", "_")
    return keras.Model(inputs={"features": features, "mask": mask_input}, outputs=probabilities, name=name)


HEADS = {
    "gru": recurrent_head(gru),
    "lstm": recurrent_head(lstm),
    "bilstm": recurrent_head(bilstm),
    "attention": attention_head,
    "transformer": transformer_head,
    "mean": mean_head,
    "segments": segments_head,
    "cnn-lstm": cnn_lstm_head,
}
"""Classifier heads: name -> builder ``(x, mask, config) -> x`` (the pooled vector the softmax reads)."""

if tuple(HEADS) != HEAD_NAMES:  # pragma: no cover - caught by the first import in any test
    raise ImportError(
        f"featpipe.training.heads.registry.HEADS {tuple(HEADS)} and featpipe.names.HEAD_NAMES {HEAD_NAMES} differ."
    )
