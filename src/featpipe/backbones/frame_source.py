"""Frame sources: what turns uint8 frames into per-frame features, and the one way to get one.

A frame source (:class:`FrameSource`) is what the stages (:mod:`featpipe.extraction.stages`) push
batches of frames through. Three kinds satisfy it:

* :class:`FeatureExtractor` -- a frozen network built from a registry entry, run batch by batch;
* :class:`RawFrames` -- the ``raw`` entry: no network, a frame's "features" are its own pixels;
* the Ray engine's ``DriverBackbone`` (:mod:`featpipe.extraction.engines.ray`) -- the driver's view of
  a network that runs on the cluster's actors (it records; it is never called on frames).

:func:`frame_source` picks the kind a registry entry needs; extract, predict and the Ray actors use it.
"""

from __future__ import annotations

import warnings
from typing import Protocol, runtime_checkable

import numpy as np

from featpipe.backbones.registry import (
    RAW_FINGERPRINT,
    WEIGHTS_IMAGENET,
    WEIGHTS_NONE,
    Backbone,
    check_precision,
    check_size,
    get_backbone,
)
from featpipe.backbones.weights import build_model, fingerprint, weights_label
from featpipe.errors import BackboneError
from featpipe.runtime.devices import current_device
from featpipe.runtime.keras_import import import_keras


@runtime_checkable
class FrameSource(Protocol):
    """What extract, predict and the stages use of a frame source, stated once.

    What the cache records of it: ``backbone`` (the registry entry), ``size`` (square input, pixels),
    ``weights`` (the label: "imagenet", "none" or an absolute path), ``precision`` (compute dtype
    policy), ``fingerprint`` (of the weight values; None while still being computed, see
    :meth:`wait`) and ``feature_shape`` (per frame). ``batch_size`` is the frames of one call.
    ``clip_frames`` (K) is how many consecutive frames of one clip the network embeds at once: 1 for an image
    network; for a video-native one every call takes whole chunks of K frames and ``batch_size`` is a multiple
    of K.
    """

    backbone: Backbone
    size: int
    weights: str
    precision: str
    fingerprint: str | None
    feature_shape: tuple[int, ...]
    clip_frames: int

    @property
    def batch_size(self) -> int: ...

    def cache_dtype(self, requested: str) -> str:
        """The dtype its features are stored in, given --dtype ``requested``."""

    def wait(self) -> str:
        """The weights fingerprint, once known (raises what building the network raised)."""

    def warm_up(self) -> None:
        """Compile now, as set-up, where that is worth it; a no-op otherwise."""

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """(n, size, size, 3) uint8, n <= batch_size (a multiple of clip_frames) -> (n, *feature_shape) features."""


def frame_source(
    backbone: Backbone | str,
    size: int | None = None,
    weights: str = WEIGHTS_IMAGENET,
    seed: int = 0,
    batch_size: int | None = 32,
    precision: str = "float32",
) -> FeatureExtractor | RawFrames:
    """The frame source for a registry entry (or its name): :class:`RawFrames` for the ``raw`` entry, else a
    :class:`FeatureExtractor` building the network with ``weights`` (seeded by ``seed`` for "none")."""
    entry = _entry(backbone)
    if entry.raw:
        return RawFrames(entry, size, batch_size, precision)
    return FeatureExtractor(entry, size, weights, seed, batch_size, precision)


def _entry(backbone: Backbone | str) -> Backbone:
    return get_backbone(backbone) if isinstance(backbone, str) else backbone


def _inference_model(backbone: Backbone, size: int, model, precision: str, jit_compile):
    """Wrap the float32 feature network for inference: uint8 frames in, float32 features out.

    The backbone's own ``preprocess_input`` runs INSIDE the graph (on the device, after a
    uint8 transfer that is 4x smaller than float32), so the host thread only stacks frames.
    A video-native backbone (``clip_frames`` K > 1) takes chunks ``(B, K, size, size, 3)``: its frames are
    preprocessed one by one, the network maps the chunks to ``(B, K, feature_dim)``.
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
    k = backbone.clip_frames
    frames = keras.Input((k, size, size, 3) if k > 1 else (size, size, 3), dtype="uint8", name="frames")
    x = keras.ops.cast(frames, "float32")
    if k > 1:
        x = backbone.preprocess_input(keras.ops.reshape(x, (-1, size, size, 3)))
        x = keras.ops.reshape(x, (-1, k, *x.shape[1:]))
    else:
        x = backbone.preprocess_input(x)
    features = keras.ops.cast(net(x, training=False), "float32")
    wrapped = keras.Model(frames, features, name=f"{backbone.file_stem}_features")
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

    A video-native backbone (``clip_frames`` K > 1) embeds chunks of K consecutive frames: ``batch_size`` is
    rounded up to a multiple of K, a call takes whole chunks (``(n*K, size, size, 3)``, each K frames of one
    clip in order) and returns one feature per frame (``(n*K, feature_dim)``).
    """

    storage_dtype: str | None = None  # the dtype the cache must use whatever --dtype says (RawFrames: uint8)
    jit_compile: bool | str  # True (compiled, an accelerator), "auto" (Keras decides, a CPU) or False

    def __new__(cls, backbone: Backbone | str, *args, **kwargs):
        """A network; kept working for the ``raw`` entry, which has none: that gives :func:`frame_source`'s
        :class:`RawFrames` (callers in featpipe use :func:`frame_source` and never rely on this)."""
        entry = _entry(backbone)
        if cls is FeatureExtractor and entry.raw:
            return frame_source(entry, *args, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        backbone: Backbone | str,
        size: int | None = None,
        weights: str = WEIGHTS_IMAGENET,
        seed: int = 0,
        batch_size: int | None = 32,
        precision: str = "float32",
    ):
        self.backbone = _entry(backbone)
        self.size = check_size(self.backbone, size or self.backbone.default_size)
        self.weights = weights_label(weights, self.backbone)
        self.seed = seed
        self.precision = check_precision(precision)
        self._auto_batch = batch_size is None
        model = build_model(self.backbone, self.size, self.weights, seed)
        self.fingerprint = fingerprint(model)
        self.feature_shape: tuple[int, ...] = (self.backbone.feature_dim,)
        self.clip_frames = k = int(self.backbone.clip_frames)
        if self.backbone.load is not None and int(model.output.shape[-1]) != self.backbone.feature_dim:
            raise BackboneError(
                f"{self.backbone.name} gives {model.output.shape[-1]}-d features, not the {self.backbone.feature_dim} "
                "its entry declares; check the weights or preset folder passed."
            )
        device = current_device()
        self.batch_size = int(batch_size or auto_batch_size(model, device, self.precision, k))
        self.batch_size = -(-self.batch_size // k) * k  # whole chunks
        self.jit_compile = True if device.accelerator else "auto"
        self.model = _inference_model(self.backbone, self.size, model, self.precision, self.jit_compile)
        self._micro = self.batch_size // k  # network inputs (frames, or chunks) per device call; halved on OOM

    def cache_dtype(self, requested: str) -> str:
        """The dtype features are stored in: ``requested`` (--dtype) for a network."""
        return requested

    def wait(self) -> str:
        """The weights fingerprint: known once the network is built, so at once."""
        return self.fingerprint

    def warm_up(self) -> None:
        """Compile the forward pass now, as set-up, where that is worth it (an accelerator).

        On a CPU the first real batch traces it instead: a warm-up batch there costs a whole forward pass.
        """
        if self.jit_compile is True:
            self(np.zeros((self.clip_frames, self.size, self.size, 3), np.uint8))

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """(n, size, size, 3) uint8, n <= batch_size -> (n, *feature_shape) float32 features.

        With ``clip_frames`` K > 1, n is a multiple of K: frames ``[i*K, (i+1)*K)`` are one chunk."""
        n, k = len(frames), self.clip_frames
        if n > self.batch_size:
            raise ValueError(f"got {n} frames for a batch of {self.batch_size}")
        if n % k:
            raise ValueError(f"got {n} frames for chunks of {k}")
        if n == 0:
            return np.zeros((0, *self.feature_shape), np.float32)
        if n == self.batch_size:  # the usual full batch: no padding copy on the hot path
            batch = np.ascontiguousarray(frames, dtype=np.uint8)
        else:
            batch = np.zeros((self.batch_size, self.size, self.size, 3), dtype=np.uint8)
            batch[:n] = frames
        inputs = batch.reshape(-1, k, *batch.shape[1:]) if k > 1 else batch  # (chunks, K, size, size, 3)
        used = n // k  # network inputs that hold real frames
        while True:
            try:  # every call has the same shape (_micro divides batch_size), so one compiled trace
                parts = [self.model.predict_on_batch(inputs[i : i + self._micro]) for i in range(0, used, self._micro)]
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
        out = np.concatenate([np.asarray(p, dtype=np.float32) for p in parts])
        return out.reshape(-1, *self.feature_shape)[:n] if k > 1 else out[:n]


class RawFrames:
    """The ``raw`` frame source: no network, a frame's "features" are its own uint8 pixels.

    ``frame_source("raw", size)`` builds one. It is a :class:`FrameSource` like a network and goes
    through the same stages (batch_size, feature_shape, fingerprint, ``__call__``), stores ``(size, size, 3)`` uint8
    whatever ``--dtype`` says, and has nothing to compile or warm up.
    """

    storage_dtype = "uint8"

    def __init__(
        self,
        backbone: Backbone | str = "raw",
        size: int | None = None,
        batch_size: int | None = 32,
        precision: str = "float32",
    ):
        self.backbone = _entry(backbone)
        self.size = check_size(self.backbone, size or self.backbone.default_size)
        self.weights = WEIGHTS_NONE  # no network: no weights, no seed
        self.precision = check_precision(precision)
        self.model = None
        self.jit_compile = False
        self.fingerprint = RAW_FINGERPRINT
        self.feature_shape = (self.size, self.size, 3)
        self.clip_frames = 1
        self.batch_size = int(batch_size or 32)

    def cache_dtype(self, requested: str) -> str:
        """Always uint8: the frames themselves, whatever --dtype says."""
        return self.storage_dtype

    def wait(self) -> str:
        return self.fingerprint

    def warm_up(self) -> None:
        """Nothing to compile."""

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


_MAX_AUTO_BATCH = 256


def auto_batch_size(model, device=None, precision: str = "float32", clip_frames: int = 1) -> int:
    """Frames per forward pass when --batch-size is not given.

    CPU: 32. Accelerator: the largest power of two whose activations fit in half the free
    device memory, taking half the sum of all layer outputs per frame (frameworks reuse
    buffers; mixed precision halves them again), between 8 and 256. For a video-native network
    (``clip_frames`` K > 1, whose input is a chunk of K frames) the estimate counts chunks, and the
    frames are that many chunks of K (on a CPU: 32 rounded up to whole chunks).
    """
    device = device or current_device()
    if not device.accelerator:
        return -(-32 // clip_frames) * clip_frames
    if not device.free_bytes:
        return 128 * clip_frames
    per_frame = activation_bytes_per_frame(model) / 2
    if precision != "float32":
        per_frame /= 2
    fits = int(device.free_bytes * 0.5 / max(per_frame, 1))
    size = 8
    while size * 2 <= min(fits, _MAX_AUTO_BATCH):
        size *= 2
    return size * clip_frames
