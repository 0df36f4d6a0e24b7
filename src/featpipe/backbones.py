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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
        import keras

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
    import keras

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


class FeatureExtractor:
    """A frozen backbone that turns uint8 RGB frames into pooled features, batch by batch.

    Every call runs one fixed-shape batch (``batch_size`` frames, zero-padded) so the compiled
    predict function is traced once.
    """

    def __init__(self, backbone: Backbone | str, size: int | None = None, weights: str = WEIGHTS_IMAGENET,
                 seed: int = 0, batch_size: int = 32):
        self.backbone = get_backbone(backbone) if isinstance(backbone, str) else backbone
        self.size = check_size(self.backbone, size or self.backbone.default_size)
        self.weights = weights_label(weights)
        self.seed = seed
        self.batch_size = int(batch_size)
        if self.backbone.raw:
            self.weights = WEIGHTS_NONE
            self.model = None
            self.fingerprint = RAW_FINGERPRINT
            self.feature_shape: tuple[int, ...] = (self.size, self.size, 3)
        else:
            self.model = build_model(self.backbone, self.size, self.weights, seed)
            self.fingerprint = fingerprint(self.model)
            self.feature_shape = (self.backbone.feature_dim,)

    @property
    def storage_dtype(self) -> str | None:
        """The dtype the cache must use regardless of --dtype (uint8 frames for raw), else None."""
        return "uint8" if self.backbone.raw else None

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """(n, size, size, 3) uint8, n <= batch_size -> (n, *feature_shape) features (float32, or the frames for raw)."""
        n = len(frames)
        if n > self.batch_size:
            raise ValueError(f"got {n} frames for a batch of {self.batch_size}")
        if self.backbone.raw:
            return np.asarray(frames)
        batch = np.zeros((self.batch_size, self.size, self.size, 3), dtype=np.uint8)
        batch[:n] = frames
        out = self.model.predict_on_batch(self.backbone.preprocess(batch))
        return np.asarray(out, dtype=np.float32)[:n]


def default_batch_size() -> int:
    """Frames per forward pass when --batch-size is not given: larger on an accelerator."""
    import keras

    devices = [d.lower() for d in keras.distribution.list_devices()]
    return 128 if any(d.startswith(("gpu", "cuda", "tpu")) for d in devices) else 32
