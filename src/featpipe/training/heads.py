"""Mask-aware sequence classifiers for the stage-two trainer.

Every model takes two inputs, ``"features"`` ``(B, T, *feature_shape)`` float32 and ``"mask"``
``(B, T)`` bool (True exactly for real frames; real frames first, padding after), and returns
softmax probabilities ``(B, n_classes)``.

Mask-awareness is a hard guarantee for every head: predictions do not change when the values at
padded steps change, or when more padded steps are appended. It is obtained in two layers:

* the padded steps of the input are replaced by zeros first (:class:`ZeroPadded`), so even
  NaN/inf garbage at padded steps cannot leak through a ``0 * x`` product;
* every temporal operation is masked: the frame mask is passed EXPLICITLY to every recurrent
  layer (``layer(x, mask=mask)``, never relying on Keras' implicit mask propagation), attention
  keys are masked, and all pooling (mean, attention) only sees real steps.

Only ``keras.ops`` / ``keras.layers`` are used (no TensorFlow calls, no ``Lambda`` layers), so
models run on the TensorFlow, JAX and PyTorch backends and save to ``.keras`` files that
``keras.saving.load_model`` reads in safe mode. The small custom layers below are registered
under the ``featpipe`` package: import :mod:`featpipe.training.heads` before loading a model file.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields

import numpy as np

from featpipe.errors import FeatpipeError
from featpipe.names import HEAD_NAMES, IMAGE_HEADS, RECURRENT_HEADS
from featpipe.runtime.keras_import import import_keras

keras = import_keras()
layers, ops = keras.layers, keras.ops

FEATURE_HEADS = tuple(h for h in HEAD_NAMES if h not in IMAGE_HEADS)

_FEATURE_CACHE_HINT = "a feature cache from `featpipe extract` with a CNN backbone (e.g. `--backbone resnet50`)"
_RAW_CACHE_HINT = "a raw-frame cache (`featpipe extract --backbone raw --size 64`)"
_MIN_IMAGE_SIZE = 8  # three 2x2 max-poolings: 8 -> 4 -> 2 -> 1


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadConfig:
    """Hyper-parameters of one classifier head. Validated on construction."""

    head: str = "gru"  # one of HEADS
    units: int = 64  # recurrent units / model width
    layers: int = 1  # stacked recurrent (or transformer) layers
    dropout: float = 0.3
    num_heads: int = 4  # transformer attention heads
    segments: int = 4  # segments head: temporal segments whose masked means are classified
    bottleneck: int = 0  # feature heads: a learned Dense(bottleneck) + dropout before the head (0 = none)
    input_dropout: float = 0.0  # feature dropout: whole feature channels dropped for all steps of a clip
    pca: int = 0  # feature heads: project on the first `pca` whitened principal axes of the train frames
    frames: int = 0  # frames the head sees: 0 = every cached step; else a subset (jittered when training)
    pooled_steps: int = 0  # recurrent heads: read the masked means of this many temporal segments (0 = every frame)
    shortcut: int = 0  # recurrent heads: a frozen linear classifier of this many segment means (0 = no shortcut)
    l2: float = 0.0  # L2 penalty on the trained classifier's weights (added to the mean loss of each batch)

    def __post_init__(self) -> None:
        if not isinstance(self.head, str):
            raise FeatpipeError(f"Head must be a name, one of {', '.join(HEADS)}; got {self.head!r}.")
        head = self.head.strip().lower()
        if head not in HEADS:
            raise FeatpipeError(f"Unknown head {self.head!r}: choose one of {', '.join(HEADS)}.")
        object.__setattr__(self, "head", head)
        for name, low in (
            ("units", 1),
            ("layers", 1),
            ("num_heads", 1),
            ("segments", 1),
            ("bottleneck", 0),
            ("pca", 0),
            ("frames", 0),
            ("pooled_steps", 0),
            ("shortcut", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise FeatpipeError(f"{name} must be a whole number >= {low}; got {value!r}.")
            if value < low:
                raise FeatpipeError(f"{name} must be >= {low}; got {value}.")
            object.__setattr__(self, name, int(value))
        for name in ("dropout", "input_dropout"):
            dropout = getattr(self, name)
            if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
                raise FeatpipeError(f"{name} must be a number in [0, 1); got {dropout!r}.")
            if not (0.0 <= float(dropout) < 1.0):  # also rejects NaN
                raise FeatpipeError(f"{name} must be in [0, 1) (a fraction of units dropped); got {dropout}.")
            object.__setattr__(self, name, float(dropout))
        if isinstance(self.l2, bool) or not isinstance(self.l2, numbers.Real) or not (0.0 <= float(self.l2) <= 100.0):
            raise FeatpipeError(f"l2 must be a number from 0 (no penalty) to 100; got {self.l2!r}.")
        object.__setattr__(self, "l2", float(self.l2))
        if self.bottleneck and self.pca:
            raise FeatpipeError("Choose a learned bottleneck or a PCA projection, not both.")

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict; ``HeadConfig.from_dict(c.to_dict()) == c``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HeadConfig":
        """Inverse of :meth:`to_dict`; missing keys take their defaults, unknown keys are refused."""
        if not isinstance(d, dict):
            raise FeatpipeError(f"A head config must be a mapping of {_field_names()}; got {type(d).__name__}.")
        unknown = sorted(set(d) - set(_field_names()))
        if unknown:
            raise FeatpipeError(
                f"Unknown head config key(s) {', '.join(map(str, unknown))}: allowed keys are "
                f"{', '.join(_field_names())}."
            )
        return cls(**d)


def _field_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(HeadConfig))


# --------------------------------------------------------------------------------------------
# Custom layers (weightless, backend-agnostic, serialisable)
# --------------------------------------------------------------------------------------------


def _step_mask(mask, x):
    """(B, T) bool -> broadcastable to x (B, T, ...)."""
    mask = ops.cast(mask, "bool")
    for _ in range(len(x.shape) - 2):
        mask = ops.expand_dims(mask, -1)
    return mask


@keras.saving.register_keras_serializable(package="featpipe")
class ZeroPadded(layers.Layer):
    """Replace padded steps (mask False) by exact zeros; real steps pass unchanged.

    ``ops.where`` (not multiplication) so that NaN/inf at padded steps are removed too.
    """

    def call(self, inputs, mask=None):
        if mask is None:
            return inputs
        return ops.where(_step_mask(mask, inputs), inputs, ops.zeros_like(inputs))

    def compute_mask(self, inputs, mask=None):
        # Deliberately no implicit Keras mask downstream: every layer that needs the frame mask
        # gets it passed explicitly (implicit propagation is fragile through TimeDistributed,
        # Rescaling, MultiHeadAttention query masks, ...).
        return None

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="featpipe")
class SinusoidalPositionEncoding(layers.Layer):
    """Add the fixed sinusoidal encoding of the step index (Vaswani et al.) to ``(B, T, D)``.

    Computed on the fly from ``arange(T)``: there is no maximum length, and step ``t`` gets the
    same encoding whatever T is, so appending padded steps never changes real steps.
    """

    def __init__(self, base: float = 10000.0, **kwargs):
        super().__init__(**kwargs)
        self.base = float(base)

    def call(self, inputs, mask=None):
        steps = ops.shape(inputs)[1]
        dim = inputs.shape[-1]
        position = ops.expand_dims(ops.cast(ops.arange(steps), "float32"), 1)  # (T, 1)
        index = ops.arange(dim)  # (D,)
        pair = ops.cast(index // 2 * 2, "float32")
        inv_freq = ops.exp(-math.log(self.base) * pair / float(dim))  # (D,)
        angles = position * ops.expand_dims(inv_freq, 0)  # (T, D)
        encoding = ops.where(ops.expand_dims(index % 2 == 0, 0), ops.sin(angles), ops.cos(angles))
        return inputs + ops.cast(ops.expand_dims(encoding, 0), inputs.dtype)

    def compute_mask(self, inputs, mask=None):
        return mask

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "base": self.base}


@keras.saving.register_keras_serializable(package="featpipe")
class KeyPaddingMask(layers.Layer):
    """Frame mask ``(B, T)`` -> attention mask ``(B, T, T)``: query i may attend key j iff j is real.

    Masking keys only (not queries) means no attention row is fully masked (as long as a clip
    has one real frame); rows of padded queries are computed but ignored by the masked pooling.
    """

    def call(self, mask):
        mask = ops.cast(mask, "bool")
        keys = ops.expand_dims(mask, 1)  # (B, 1, T)
        queries = ops.expand_dims(ops.ones_like(mask), 2)  # (B, T, 1), all True
        return ops.logical_and(queries, keys)

    def compute_mask(self, inputs, mask=None):
        return None

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1], input_shape[1])

    def compute_output_spec(self, mask):
        return keras.KerasTensor(self.compute_output_shape(mask.shape), dtype="bool")


@keras.saving.register_keras_serializable(package="featpipe")
class MaskedAverage(layers.Layer):
    """Average ``(B, T, D)`` over real steps only -> ``(B, D)``; zeros for a clip with no real step."""

    def call(self, inputs, mask=None):
        if mask is None:
            return ops.mean(inputs, axis=1)
        m = _step_mask(mask, inputs)
        total = ops.sum(ops.where(m, inputs, ops.zeros_like(inputs)), axis=1)
        count = ops.sum(ops.cast(m, inputs.dtype), axis=1)
        return total / ops.maximum(count, ops.cast(1.0, inputs.dtype))

    def compute_mask(self, inputs, mask=None):
        return None  # pooled over time: no per-step mask any more

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *input_shape[2:])


@keras.saving.register_keras_serializable(package="featpipe")
class MaskedAttentionPooling(layers.Layer):
    """Attention pooling: softmax of per-step ``scores`` ``(B, T, 1)`` over REAL steps only, then
    the weighted sum of ``values`` ``(B, T, D)`` -> ``(B, D)``.

    Padded steps get weight exactly 0 and their values are zeroed with ``where``, so neither
    their scores nor their values can reach the output.
    """

    def call(self, values, scores, mask=None):
        scores = ops.cast(ops.squeeze(scores, -1), "float32")  # softmax in float32 (mixed precision safe)
        if mask is not None:
            mask = ops.cast(mask, "bool")
            scores = ops.where(mask, scores, ops.full_like(scores, -1e9))
        weights = ops.softmax(scores, axis=1)
        if mask is not None:
            weights = ops.where(mask, weights, ops.zeros_like(weights))
            values = ops.where(_step_mask(mask, values), values, ops.zeros_like(values))
        weights = ops.cast(ops.expand_dims(weights, -1), values.dtype)
        return ops.sum(weights * values, axis=1)

    def compute_mask(self, values, scores=None, mask=None):
        return None

    def compute_output_shape(self, values_shape, scores_shape=None):
        return (values_shape[0], *values_shape[2:])


def _real_counts(mask):
    """(B, T) bool -> (B,) int32 number of real frames (real frames come first)."""
    return ops.sum(ops.cast(mask, "int32"), axis=1)


@keras.saving.register_keras_serializable(package="featpipe")
class FrameSubset(layers.Layer):
    """Keep ``frames`` of a clip's real frames: fixed uniform positions at inference, a jittered
    sorted subset (one frame drawn in each of ``frames`` equal segments) while training.

    Inputs ``(features (B, T, ...), mask (B, T))``; outputs the same pair with ``frames`` steps.
    A clip with at most ``frames`` real frames keeps all of them (then padding). The inference
    positions are exactly :func:`featpipe.video.decode.sample_indices` (uniform) applied to the real
    frames, computed in integers; :func:`featpipe.training.inputs.subset_positions` is the same rule in
    NumPy. The draws come from a seeded generator saved with the layer, so a seed gives the same
    subsets epoch after epoch on a rerun, and a new subset each step.
    """

    def __init__(self, frames: int, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.frames = int(frames)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def positions(self, counts, training=False):
        """(B,) real-frame counts -> (B, frames) int32 positions and (B, frames) bool mask."""
        k = self.frames
        n = ops.expand_dims(ops.cast(counts, "int32"), 1)  # (B, 1)
        i = ops.expand_dims(ops.arange(k, dtype="int32"), 0)  # (1, K)
        short = n <= k
        if training:
            lo = (i * n) // k
            hi = ((i + 1) * n) // k
            u = keras.random.uniform(ops.shape(lo), seed=self.seed_generator)
            width = ops.cast(ops.maximum(hi - lo, 1), "float32")
            long_pos = lo + ops.minimum(ops.cast(u * width, "int32"), ops.cast(width, "int32") - 1)
        elif k == 1:
            long_pos = ops.zeros_like(i + n)
        else:  # floor(i * (n - 1) / (k - 1) + 1/2), in integers: linspace rounded half up
            long_pos = (2 * i * (n - 1) + (k - 1)) // (2 * (k - 1))
        pos = ops.where(short, ops.where(i < n, i, ops.zeros_like(i)), long_pos)
        keep = i < ops.minimum(n, k)
        return pos, keep

    def call(self, features, frame_mask, training=False):
        pos, keep = self.positions(_real_counts(frame_mask), training=bool(training))
        index = pos
        for _ in range(len(features.shape) - 2):
            index = ops.expand_dims(index, -1)
        picked = ops.take_along_axis(features, index, axis=1)
        picked = ops.where(_step_mask(keep, picked), picked, ops.zeros_like(picked))
        return picked, keep

    def compute_output_spec(self, features, frame_mask, training=False):
        shape = (features.shape[0], self.frames, *features.shape[2:])
        return (
            keras.KerasTensor(shape, dtype=features.dtype),
            keras.KerasTensor((frame_mask.shape[0], self.frames), dtype="bool"),
        )

    def get_config(self):
        return {**super().get_config(), "frames": self.frames, "seed": self.seed}


@keras.saving.register_keras_serializable(package="featpipe")
class SegmentMeans(layers.Layer):
    """TSN-style consensus: the masked means of ``segments`` equal temporal segments of the REAL
    frames, ``(B, T, D)`` -> ``(B, segments, D)``.

    Segment ``i`` of a clip with ``n`` real frames covers ``[floor(i n / K), floor((i+1) n / K))``,
    widened to one frame when empty, so a clip shorter than ``K`` frames repeats frames instead of
    producing empty (NaN) means; a clip without real frames gives zeros. Padded steps never count.
    """

    def __init__(self, segments: int, **kwargs):
        super().__init__(**kwargs)
        self.segments = int(segments)

    def call(self, inputs, mask=None):
        k = self.segments
        steps = ops.shape(inputs)[1]
        n = ops.reshape(_real_counts(mask), (-1, 1, 1))  # (B, 1, 1)
        i = ops.reshape(ops.arange(k, dtype="int32"), (1, k, 1))
        t = ops.reshape(ops.arange(steps, dtype="int32"), (1, 1, -1))
        lo = (i * n) // k
        hi = ops.maximum((i + 1) * n // k, ops.minimum(lo + 1, n))
        inside = ops.logical_and(ops.logical_and(t >= lo, t < hi), ops.expand_dims(ops.cast(mask, "bool"), 1))
        weights = ops.cast(inside, inputs.dtype)  # (B, K, T)
        weights = weights / ops.maximum(ops.sum(weights, axis=2, keepdims=True), ops.cast(1.0, inputs.dtype))
        values = ops.where(_step_mask(mask, inputs), inputs, ops.zeros_like(inputs))
        return ops.matmul(weights, values)

    def compute_mask(self, inputs, mask=None):
        return None

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.segments, *input_shape[2:])

    def get_config(self):
        return {**super().get_config(), "segments": self.segments}


@keras.saving.register_keras_serializable(package="featpipe")
class AnyRealStep(layers.Layer):
    """Frame mask ``(B, T)`` -> ``(B, steps)`` mask of segment means: all True for a clip with a real
    frame (:class:`SegmentMeans` never leaves a segment empty then), all False for an empty clip."""

    def __init__(self, steps: int, **kwargs):
        super().__init__(**kwargs)
        self.steps = int(steps)

    def call(self, mask):
        any_real = ops.any(ops.cast(mask, "bool"), axis=1, keepdims=True)  # (B, 1)
        return ops.logical_and(any_real, ops.ones((1, self.steps), dtype="bool"))

    def compute_output_spec(self, mask):
        return keras.KerasTensor((mask.shape[0], self.steps), dtype="bool")

    def get_config(self):
        return {**super().get_config(), "steps": self.steps}


@keras.saving.register_keras_serializable(package="featpipe")
class SparseSmoothedCrossentropy(keras.losses.Loss):
    """Sparse categorical cross-entropy with label smoothing (Keras' sparse loss has none)."""

    def __init__(self, smoothing: float = 0.0, name: str = "sparse_smoothed_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.smoothing = float(smoothing)

    def call(self, y_true, y_pred):
        n = y_pred.shape[-1]
        y = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), n, dtype=y_pred.dtype)
        y = y * (1.0 - self.smoothing) + self.smoothing / n
        return keras.losses.categorical_crossentropy(y, y_pred)

    def get_config(self):
        return {**super().get_config(), "smoothing": self.smoothing}


# --------------------------------------------------------------------------------------------
# Model construction
# --------------------------------------------------------------------------------------------


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
        if min(shape[:2]) < _MIN_IMAGE_SIZE:
            raise FeatpipeError(
                f"Head {config.head!r} needs frames of at least {_MIN_IMAGE_SIZE}x{_MIN_IMAGE_SIZE} pixels; "
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


def _gru(config: HeadConfig, return_sequences: bool, index: int):
    return layers.GRU(config.units, return_sequences=return_sequences, name=f"gru_{index}")


def _lstm(config: HeadConfig, return_sequences: bool, index: int):
    return layers.LSTM(config.units, return_sequences=return_sequences, name=f"lstm_{index}")


def _bilstm(config: HeadConfig, return_sequences: bool, index: int):
    return layers.Bidirectional(_lstm(config, return_sequences, index), name=f"bilstm_{index}")


def _recurrent_stack(x, mask, config: HeadConfig, cell):
    for i in range(config.layers):
        last = i == config.layers - 1
        x = cell(config, return_sequences=not last, index=i)(x, mask=mask)
        x = layers.Dropout(config.dropout, name=f"dropout_{i}")(x)
    return x


def _transformer_stack(x, mask, config: HeadConfig):
    attention_mask = KeyPaddingMask(name="attention_mask")(mask)
    key_dim = max(1, config.units // config.num_heads)
    for i in range(config.layers):
        attended = layers.MultiHeadAttention(
            num_heads=config.num_heads, key_dim=key_dim, dropout=config.dropout, name=f"mha_{i}"
        )(x, x, attention_mask=attention_mask)
        attended = layers.Dropout(config.dropout, name=f"mha_dropout_{i}")(attended)
        x = layers.LayerNormalization(epsilon=1e-6, name=f"mha_norm_{i}")(
            layers.Add(name=f"mha_add_{i}")([x, attended])
        )
        ff = layers.Dense(2 * config.units, activation="relu", name=f"ff_in_{i}")(x)
        ff = layers.Dense(config.units, name=f"ff_out_{i}")(ff)
        ff = layers.Dropout(config.dropout, name=f"ff_dropout_{i}")(ff)
        x = layers.LayerNormalization(epsilon=1e-6, name=f"ff_norm_{i}")(layers.Add(name=f"ff_add_{i}")([x, ff]))
    pooled = MaskedAverage(name="masked_mean")(x, mask=mask)
    return layers.Dropout(config.dropout, name="pooled_dropout")(pooled)


def _cnn_frames(x, config: HeadConfig):
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(x)
    for filters in (32, 64, 128):
        x = layers.TimeDistributed(
            layers.Conv2D(filters, 3, padding="same", activation="relu"), name=f"conv_{filters}"
        )(x)
        x = layers.TimeDistributed(layers.MaxPooling2D(2), name=f"pool_{filters}")(x)
    return layers.TimeDistributed(layers.GlobalAveragePooling2D(), name="frame_vector")(x)


def build_model(
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
        raise FeatpipeError(f"config must be a featpipe.training.heads.HeadConfig; got {type(config).__name__}.")
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
        x = _cnn_frames(x, config)
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


SHORTCUT_C = 0.05
"""Inverse L2 strength (scikit-learn's C) of the shortcut's logistic regression: strong, as few clips need."""


def fit_shortcut(model, chunks, labels, c: float = SHORTCUT_C) -> bool:
    """Fit the frozen ``shortcut_logits`` layer of a recurrent head (``shortcut > 0``) as scikit-learn's
    L2-regularised logistic regression on the model's own standardised segment means of the training clips.

    ``chunks`` yields ``(features, mask)`` arrays of the training clips, in the order of ``labels``. The
    means come from the model in inference mode (uniform frame positions), exactly what it computes at
    evaluate and predict time. Returns False (and does nothing) for a model without a shortcut.
    """
    if "shortcut_logits" not in {layer.name for layer in model.layers}:
        return False
    from sklearn.linear_model import LogisticRegression  # lazy: scikit-learn

    means = keras.Model(model.inputs, model.get_layer("shortcut_flat").output)
    design = []
    for features, mask in chunks:
        for lo in range(0, len(features), 256):
            batch = {"features": features[lo : lo + 256], "mask": mask[lo : lo + 256]}
            design.append(np.asarray(means(batch, training=False), dtype=np.float32))
    design = np.concatenate(design)
    labels = np.asarray(labels)
    if len(design) != len(labels):
        raise FeatpipeError(f"fit_shortcut got {len(design)} clips and {len(labels)} labels.")
    layer = model.get_layer("shortcut_logits")
    kernel = np.zeros(layer.kernel.shape, np.float32)
    bias = np.zeros(layer.bias.shape, np.float32)
    present = np.unique(labels)
    if len(present) >= 2:
        # Fewer clips than dimensions (the usual case): the L2-regularised solution lies in the span of the
        # clips, so fit on their coordinates in an orthonormal basis of that span (exact, and 10-100x faster).
        basis = np.linalg.svd(design, full_matrices=False)[2] if len(design) < design.shape[1] else None
        coords = design if basis is None else design @ basis.T
        probe = LogisticRegression(C=c, max_iter=2000).fit(coords, labels)
        coef = probe.coef_ if basis is None else probe.coef_ @ basis
        if len(probe.classes_) == 2:  # one weight vector: the logit of the second class against the first's 0
            kernel[:, probe.classes_[1]], bias[probe.classes_[1]] = coef[0], probe.intercept_[0]
        else:
            kernel[:, probe.classes_], bias[probe.classes_] = coef.T, probe.intercept_
    layer.set_weights([kernel, bias])
    return True


# --------------------------------------------------------------------------------------------
# Heads: name -> builder (x, mask, config) -> x. A new head is one builder plus one entry here
# and its name in featpipe.names.HEAD_NAMES (which the CLI reads without importing Keras).
# --------------------------------------------------------------------------------------------


def _recurrent_head(cell):
    def build(x, mask, config: HeadConfig):
        if config.pooled_steps:  # a short sequence of segment means: less per-frame noise, order kept
            x = SegmentMeans(config.pooled_steps, name="pooled_steps")(x, mask=mask)
            mask = AnyRealStep(config.pooled_steps, name="pooled_mask")(mask)
        return _recurrent_stack(x, mask, config, cell)

    return build


def _cnn_lstm_head(x, mask, config: HeadConfig):
    return _recurrent_stack(x, mask, config, _lstm)


def _mean_head(x, mask, config: HeadConfig):
    x = MaskedAverage(name="masked_mean")(x, mask=mask)
    x = layers.Dense(config.units, activation="relu", name="hidden")(x)
    return layers.Dropout(config.dropout, name="hidden_dropout")(x)


def _segments_head(x, mask, config: HeadConfig):
    x = SegmentMeans(config.segments, name="segment_means")(x, mask=mask)
    x = layers.Flatten(name="segments_flat")(x)
    x = layers.Dropout(config.dropout, name="segments_dropout")(x)
    for i in range(config.layers - 1):  # layers 1: linear classifier; more: a small MLP
        x = layers.Dense(config.units, activation="relu", name=f"segments_hidden_{i}")(x)
        x = layers.Dropout(config.dropout, name=f"segments_hidden_dropout_{i}")(x)
    return x


def _attention_head(x, mask, config: HeadConfig):
    # Attention pooling alone is permutation-invariant; the positional encoding makes the
    # head see frame order (so it is not a second "mean" control model).
    h = layers.Dense(config.units, activation="tanh", name="projection")(x)
    h = SinusoidalPositionEncoding(name="position")(h)
    scores = layers.Dense(config.units, activation="tanh", name="score_hidden")(h)
    scores = layers.Dense(1, name="score")(scores)
    x = MaskedAttentionPooling(name="attention_pool")(h, scores, mask=mask)
    return layers.Dropout(config.dropout, name="pooled_dropout")(x)


def _transformer_head(x, mask, config: HeadConfig):
    x = layers.Dense(config.units, name="projection")(x)
    x = SinusoidalPositionEncoding(name="position")(x)
    x = layers.Dropout(config.dropout, name="input_dropout")(x)
    return _transformer_stack(x, mask, config)


HEADS = {
    "gru": _recurrent_head(_gru),
    "lstm": _recurrent_head(_lstm),
    "bilstm": _recurrent_head(_bilstm),
    "attention": _attention_head,
    "transformer": _transformer_head,
    "mean": _mean_head,
    "segments": _segments_head,
    "cnn-lstm": _cnn_lstm_head,
}
"""Classifier heads: name -> builder ``(x, mask, config) -> x`` (the pooled vector the softmax reads)."""

if tuple(HEADS) != HEAD_NAMES:  # pragma: no cover - caught by the first import in any test
    raise ImportError(
        f"featpipe.training.heads.HEADS {tuple(HEADS)} and featpipe.names.HEAD_NAMES {HEAD_NAMES} differ."
    )
