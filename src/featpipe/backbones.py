"""Registry of frozen ImageNet backbones.

Each entry carries everything that must travel together: the Keras constructor, the
backbone's OWN ``preprocess_input`` (InceptionV3 scales to [-1, 1], EfficientNet takes raw
[0, 255] because rescaling is inside the model, VGG16/ResNet50 subtract ImageNet means in
BGR), the native input size and the feature dimension. Nothing applies one generic
normalisation to all backbones.

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

import numpy as np

from featpipe._quiet import import_keras
from featpipe.errors import BackboneError

WEIGHTS_IMAGENET = "imagenet"
WEIGHTS_NONE = "none"


@dataclass(frozen=True)
class Backbone:
    """One registry entry. ``module`` is the ``keras.applications`` submodule name."""

    name: str
    module: str  # e.g. "inception_v3": where constructor and preprocess_input live
    constructor: str  # e.g. "InceptionV3"
    default_size: int  # native input size (pixels, square)
    feature_dim: int  # length of the pooled feature vector
    min_size: int = 32  # smallest input Keras accepts for this network
    raw: bool = False  # True for the "raw" entry: no network, the frames themselves are stored

    def keras_module(self):
        keras = import_keras()

        return getattr(keras.applications, self.module)

    def preprocess(self, frames: np.ndarray) -> np.ndarray:
        """uint8 RGB (B, H, W, 3) -> float32 input exactly as this backbone expects it."""
        x = np.asarray(frames, dtype=np.float32).copy()
        if self.raw:
            return x
        return np.asarray(self.keras_module().preprocess_input(x), dtype=np.float32)


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
    "inceptionv3": Backbone("inceptionv3", "inception_v3", "InceptionV3", 299, 2048, min_size=75),
    **{
        f"efficientnetb{i}": Backbone(f"efficientnetb{i}", "efficientnet", f"EfficientNetB{i}", size, dim)
        for i, (size, dim) in _EFFICIENTNET.items()
    },
    "vgg16": Backbone("vgg16", "vgg16", "VGG16", 224, 512),
    "resnet50": Backbone("resnet50", "resnet50", "ResNet50", 224, 2048),
    # Not a CNN: stores the sampled uint8 frames (size x size x 3) for end-to-end models (cnn-lstm).
    "raw": Backbone("raw", "", "", 64, 0, min_size=8, raw=True),
}
RAW_FINGERPRINT = "raw-frames"  # what the cache records as weights fingerprint for the raw entry


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
    """A short hash of every weight value (shape, dtype and bytes) in model order."""
    digest = hashlib.sha256()
    for w in model.get_weights():
        a = np.ascontiguousarray(w)
        digest.update(str((a.shape, a.dtype.str)).encode())
        digest.update(a.tobytes())
    return digest.hexdigest()[:16]


def _calibration_images(n: int, size: int, seed: int) -> np.ndarray:
    """Deterministic synthetic images of mixed smoothness (flat, blotchy, noisy), uint8-range floats."""
    import cv2

    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        grid = (1, 2, 4, 8, 16, size)[i % 6]
        low = rng.uniform(0, 255, (grid, grid, 3)).astype(np.float32)
        interp = cv2.INTER_NEAREST if grid in (1, size) else cv2.INTER_LINEAR
        images.append(cv2.resize(low, (size, size), interpolation=interp))
    return np.clip(np.stack(images), 0, 255)


def _deterministic_init(model, backbone: Backbone, size: int, seed: int) -> None:
    """Give a weights=None network values that depend on ``seed`` alone, with usable scale.

    Keras' default initialisers make the deep pooled features of these networks collapse to
    nearly constant values (and underflow float16), so instead: He-normal kernels drawn from a
    seeded NumPy generator in layer order, then batch-norm statistics calibrated by one pass
    over a deterministic synthetic batch so activations stay near unit scale.
    """
    from keras import layers

    rng = np.random.default_rng(seed)
    batch_norms, dropouts = [], []
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, layers.Dropout):
            dropouts.append((layer, layer.rate))
            continue
        if isinstance(layer, layers.DepthwiseConv2D):
            kernel = layer.kernel
            fan_in = kernel.shape[0] * kernel.shape[1]
        elif isinstance(layer, (layers.Conv2D, layers.Dense)):
            kernel = layer.kernel
            fan_in = int(np.prod(kernel.shape[:-1]))
        elif isinstance(layer, layers.BatchNormalization):
            batch_norms.append((layer, layer.momentum))
            continue
        else:
            continue
        kernel.assign(rng.normal(0.0, np.sqrt(2.0 / fan_in), tuple(kernel.shape)).astype(np.float32))
    if batch_norms:
        # training=True makes batch norm use (and, with momentum 0, store) the calibration batch's
        # statistics; dropout (EfficientNet's drop-connect) is switched off so those statistics are
        # the ones inference will see.
        for layer, _ in batch_norms:
            layer.momentum = 0.0
        for layer, _ in dropouts:
            layer.rate = 0.0
        model(backbone.preprocess(_calibration_images(24, size, seed)), training=True)
        for layer, momentum in batch_norms:
            layer.momentum = momentum
        for layer, rate in dropouts:
            layer.rate = rate


def build_model(backbone: Backbone, size: int, weights: str = WEIGHTS_IMAGENET, seed: int = 0):
    """Build the frozen feature network: include_top=False, global average pooling.

    Returns a Keras model mapping preprocessed (B, size, size, 3) float32 to (B, feature_dim).
    """
    keras = import_keras()

    check_size(backbone, size)
    constructor = getattr(backbone.keras_module(), backbone.constructor)
    kwargs = dict(include_top=False, pooling="avg", input_shape=(size, size, 3))
    label = weights_label(weights)
    if label == WEIGHTS_NONE:
        keras.utils.set_random_seed(seed)
        model = constructor(weights=None, **kwargs)
        _deterministic_init(model, backbone, size, seed)
    elif label == WEIGHTS_IMAGENET:
        try:
            model = constructor(weights="imagenet", **kwargs)
        except Exception as exc:  # keras.utils.get_file raises a plain Exception on fetch failure
            raise BackboneError(
                f"Could not load the ImageNet weights for {backbone.name} ({exc}). Without internet, "
                f"pass --weights PATH to a local Keras weights file (the '_notop' .h5 for {backbone.constructor}), "
                f"or --weights none for a deterministic random network."
            ) from exc
    else:
        path = Path(label)
        if not path.is_file():
            raise BackboneError(
                f"Weights file '{path}' does not exist. Pass --weights imagenet, --weights none, "
                f"or the path of a Keras weights file for {backbone.constructor} (include_top=False)."
            )
        model = constructor(weights=None, **kwargs)
        try:
            model.load_weights(str(path))
        except (ValueError, OSError, KeyError) as exc:
            raise BackboneError(
                f"Could not load weights from '{path}' into {backbone.constructor} without its top: {exc}. "
                f"Use the '_notop' weights file for this backbone."
            ) from exc
    model.trainable = False
    return model


PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
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
            constructor = getattr(backbone.keras_module(), backbone.constructor)
            net = constructor(weights=None, include_top=False, pooling="avg", input_shape=(size, size, 3))
        finally:
            keras.config.set_dtype_policy(previous)
        net.set_weights(model.get_weights())
        net.trainable = False
    frames = keras.Input((size, size, 3), dtype="uint8", name="frames")
    x = backbone.keras_module().preprocess_input(keras.ops.cast(frames, "float32"))
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

    def __new__(cls, backbone: Backbone | str, *args, **kwargs):
        """The registry decides the frame source: the ``raw`` entry is :class:`RawFrames`, the rest are networks."""
        entry = get_backbone(backbone) if isinstance(backbone, str) else backbone
        return super().__new__(RawFrames if cls is FeatureExtractor and entry.raw else cls)

    def __init__(self, backbone: Backbone | str, size: int | None = None, weights: str = WEIGHTS_IMAGENET,
                 seed: int = 0, batch_size: int | None = 32, precision: str = "float32"):
        from featpipe.devices import current_device

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
                parts = [self.model.predict_on_batch(batch[i:i + self._micro]) for i in range(0, n, self._micro)]
                break
            except Exception as exc:
                if self._auto_batch and self._micro > 1 and _is_out_of_memory(exc):
                    self._micro //= 2  # the device is fuller than estimated: smaller calls, same results
                elif self.jit_compile is True and not _is_out_of_memory(exc):
                    # a compiler that cannot handle this graph on this backend: same results, uncompiled
                    warnings.warn(f"Compiled inference failed ({type(exc).__name__}: {exc}); running uncompiled.",
                                  RuntimeWarning, stacklevel=2)
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

    def __init__(self, backbone: Backbone | str = "raw", size: int | None = None, weights: str = WEIGHTS_NONE,
                 seed: int = 0, batch_size: int | None = 32, precision: str = "float32"):
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
    from featpipe.devices import current_device

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
