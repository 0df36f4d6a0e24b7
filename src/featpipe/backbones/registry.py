"""Registry of frozen ImageNet backbones: the entries, and looking them up.

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
A fingerprint of the weight values is recorded in the cache so that mismatches are detected
(:mod:`featpipe.backbones.weights`).

The keras-hub entries (``clip-b16``, ``clip-l14``, ``siglip2-b16``, ``dinov2-b14``, ``videoprism-b``, and
``hub:PRESET`` for a keras-hub preset name or local preset folder, :func:`get_backbone`) need the ``hub``
extra; they load their own weights (``load``: "none", "imagenet" = the preset's pretrained weights, or a preset
folder) and preprocess with their preset's image converter (:mod:`featpipe.backbones.hub`). Networks are built
and run by :mod:`featpipe.backbones.weights` and :mod:`featpipe.backbones.frame_source`; this module imports no
Keras.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from featpipe.backbones.hub import HUB_PREFIX, NAMED, folder_spec, is_preset_name, preset_spec
from featpipe.errors import BackboneError
from featpipe.names import PRECISIONS
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
    # load(weights label, seed) -> the feature network with those weights, where the entry loads its weights
    # itself (keras-hub presets: "none", "imagenet" = the preset's pretrained weights, or a preset folder);
    # None: build() and featpipe's own weights handling (featpipe.backbones.weights.build_model)
    load: Callable[[str, int], Any] | None = None
    extra: str | None = None  # the optional extra the entry needs installed ("hub": keras-hub), None for none
    default_weights: str | None = None  # what --weights imagenet (the default) means for it, if not that
    # consecutive frames of one clip the network embeds at once (a chunk): 1 for image networks, K for a
    # video-native one (videoprism-b: 16), whose network maps (chunk, K, H, W, 3) to (chunk, K, feature_dim);
    # --frames must then be a multiple of K (featpipe.extraction.stages.embed feeds whole chunks)
    clip_frames: int = 1

    def __post_init__(self):
        if not self.raw and (self.build is None or self.preprocess_input is None):
            raise BackboneError(f"Backbone '{self.name}' needs a build function and a preprocess_input.")

    @property
    def file_stem(self) -> str:
        """The name as a file name and Keras model name (see :func:`file_stem`)."""
        return file_stem(self.name)

    def preprocess(self, frames: np.ndarray) -> np.ndarray:
        """uint8 RGB (B, H, W, 3) -> float32 input exactly as this backbone expects it."""
        x = np.asarray(frames, dtype=np.float32).copy()
        if self.raw:
            return x
        return np.asarray(self.preprocess_input(x), dtype=np.float32)


def file_stem(name: str) -> str:
    """A backbone name as a file or folder name: itself, or ``hub-<folder name>`` for a ``hub:DIR`` entry
    (whose name holds the folder's path)."""
    if not name.startswith(HUB_PREFIX):
        return name
    ref = name[len(HUB_PREFIX) :]
    if "://" in ref:  # a kaggle:// or hf:// handle: every part after the scheme
        folder = ref.split("://", 1)[1].strip("/").replace("/", "-")
    else:
        folder = ref.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    return "hub-" + ("".join(c if c.isalnum() or c in "-_." else "_" for c in folder) or "preset")


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


def _hub(name: str) -> Backbone:
    """A named keras-hub entry (featpipe.backbones.hub.NAMED): needs the hub extra."""
    model, converter, dim = NAMED[name]
    return Backbone(
        name,
        model.build,
        converter,
        converter.image_size[0],
        dim,
        load=model.load,
        extra="hub",
        clip_frames=model.clip_frames,
    )


def hub_backbone(ref: str) -> Backbone:
    """The entry for ``--backbone hub:PRESET``: a keras-hub preset name (its pretrained weights are the default,
    fetched by keras-hub) or a local preset folder (its own weights are the default)."""
    if is_preset_name(ref):
        model, converter, dim = preset_spec(ref)
    else:
        model, converter, dim = folder_spec(ref)
    return Backbone(
        HUB_PREFIX + (model.folder or model.preset),
        model.build,
        converter,
        converter.image_size[0],
        dim,
        min_size=min(32, converter.image_size[0]),  # frames of any size: the converter resizes them
        load=model.load,
        extra="hub",
        default_weights=model.folder,
        clip_frames=model.clip_frames,
    )


REGISTRY: dict[str, Backbone] = {
    "inceptionv3": _application("inceptionv3", "inception_v3", "InceptionV3", 299, 2048, min_size=75),
    **{
        f"efficientnetb{i}": _application(f"efficientnetb{i}", "efficientnet", f"EfficientNetB{i}", size, dim)
        for i, (size, dim) in _EFFICIENTNET.items()
    },
    "vgg16": _application("vgg16", "vgg16", "VGG16", 224, 512),
    "resnet50": _application("resnet50", "resnet50", "ResNet50", 224, 2048),
    # Foundation models from keras-hub (the hub extra): image embeddings in CLIP's and SigLIP's joint
    # image-text spaces, DINOv2's CLS token, VideoPrism's per-frame patch mean (featpipe.backbones.hub)
    **{name: _hub(name) for name in NAMED},
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
    """Look up a backbone by name (case-insensitive), or ``hub:PRESET`` for a keras-hub preset (a name or a local
    preset folder)."""
    if name.strip().lower().startswith(HUB_PREFIX):
        return hub_backbone(name.strip()[len(HUB_PREFIX) :])
    key = name.strip().lower()
    if key not in REGISTRY:
        raise BackboneError(
            f"Unknown backbone '{name}'. Choose one of: {', '.join(REGISTRY)}; "
            "or hub:PRESET for a keras-hub preset name or preset folder."
        )
    return REGISTRY[key]


def check_size(backbone: Backbone, size: int) -> int:
    if size < backbone.min_size:
        raise BackboneError(
            f"--size {size} is too small for {backbone.name}: it needs at least {backbone.min_size} pixels "
            f"(native size {backbone.default_size})."
        )
    return size


def check_precision(precision: str) -> str:
    """``precision`` (the backbone's compute dtype policy) if it is one of PRECISIONS, else a BackboneError."""
    if precision not in PRECISIONS:
        raise BackboneError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{precision}'.")
    return precision
