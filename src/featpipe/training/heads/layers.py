"""The custom Keras layers and loss of the heads: weightless, backend-agnostic, registered as ``featpipe>Name``.

Import this module before ``keras.saving.load_model`` reads a featpipe model file (safe mode).
"""

from __future__ import annotations

import math

from featpipe.runtime.keras_import import import_keras

keras = import_keras()
layers, ops = keras.layers, keras.ops


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
