"""Foundation backbones from keras-hub (CLIP, SigLIP 2, DINOv2, VideoPrism) and local keras-hub preset folders.

Needs the ``hub`` extra (``pip install "featpipe[hub]"``: keras-hub and tensorflow-text). Importing this
module imports neither Keras nor keras-hub: :class:`HubModel` and :class:`ImageConverterSpec` are plain
frozen dataclasses (they pickle, like every registry entry) that import keras-hub when a network is built.

What the feature of each family is (one vector per frame):

* ``clip``: the image embedding in CLIP's joint image-text space (the class token after the vision
  encoder's final layer norm, through ``vision_projection``): what CLIP compares with text embeddings;
* ``siglip``: the vision encoder's pooled output (its attention-pooling head), SigLIP's joint space;
* ``dinov2``: the CLS token after the final layer norm. Patch tokens are not concatenated: the CLS token
  alone is what the DINOv2 paper's linear probes on video start from, and it keeps 768-d features;
* ``videoprism``: a video-native encoder (video-only mode, ``num_text_layers=0``): it takes ``num_frames``
  consecutive frames at once (a chunk) and returns spatio-temporal tokens (chunk, frames, patches, hidden);
  the feature of each frame is the mean over that frame's patch tokens. Its network maps a chunk
  ``(K, H, W, 3)`` to ``(K, hidden)``; :attr:`HubModel.clip_frames` is K (1 for every image family).

``--weights``: ``imagenet`` (the default; for these backbones it means the preset's pretrained weights,
downloaded once by keras-hub), ``none`` (the same architecture from the hyper-parameters shipped here or
read from the folder's ``config.json``, with a deterministic random init: no download, no keras-hub
preset needed) or a local preset folder (``config.json``, ``model.weights.h5``, as keras-hub's
``save_to_preset`` writes it and a downloaded preset is).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featpipe.errors import BackboneError

INSTALL = 'pip install "featpipe[hub]"'
HUB_PREFIX = "hub:"  # --backbone hub:PRESET, a keras-hub preset name or local preset folder
FAMILIES = {
    "CLIPBackbone": "clip",
    "SigLIPBackbone": "siglip",
    "DINOV2Backbone": "dinov2",
    "VideoPrismBackbone": "videoprism",
}
POOLED = "pooled"  # any other keras-hub image backbone (hub:PRESET): its output, averaged to one vector
_RANDOM_STD = 0.02  # the ViT init keras-hub's and the papers' configs use (truncated normal, std 0.02)


def import_keras_hub(what: str = "This backbone"):
    """keras-hub, or a BackboneError saying in one sentence which install command is missing."""
    from featpipe.runtime.keras_import import import_keras

    import_keras()
    try:
        import keras_hub
    except ImportError as exc:
        raise BackboneError(f"{what} needs keras-hub, which is not installed: run {INSTALL}.") from exc
    return keras_hub


def hub_installed() -> bool:
    """Whether keras-hub can be imported (without importing it; ``sys.modules["keras_hub"] = None`` says no)."""
    import importlib.util
    import sys

    if "keras_hub" in sys.modules:
        return sys.modules["keras_hub"] is not None
    return importlib.util.find_spec("keras_hub") is not None


@dataclass(frozen=True)
class ImageConverterSpec:
    """A preset's image converter (keras-hub's ``ImageConverter`` config): resize to ``image_size``
    (``crop_to_aspect_ratio``: centre crop first; ``interpolation``, ``antialias``), then ``x * scale + offset``
    per channel. Frames reach it as float32 RGB in [0, 255]; it runs on NumPy arrays and inside the graph."""

    image_size: tuple[int, int]
    scale: tuple[float, ...]
    offset: tuple[float, ...]
    interpolation: str = "bilinear"
    antialias: bool = False
    crop_to_aspect_ratio: bool = True

    @classmethod
    def from_config(cls, config: dict) -> ImageConverterSpec:
        size = config.get("image_size")
        if not size:
            raise BackboneError("The preset's image converter has no image_size; featpipe needs a fixed input size.")

        def per_channel(value, default):
            value = default if value is None else value
            return tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value] * 3))

        return cls(
            (int(size[0]), int(size[1])),
            per_channel(config.get("scale"), 1.0),
            per_channel(config.get("offset"), 0.0),
            str(config.get("interpolation", "bilinear")),
            bool(config.get("antialias", False)),
            bool(config.get("crop_to_aspect_ratio", True)),
        )

    def __call__(self, x):
        from keras import ops

        if tuple(x.shape[1:3]) != self.image_size:
            x = ops.image.resize(
                x,
                self.image_size,
                interpolation=self.interpolation,
                antialias=self.antialias,
                crop_to_aspect_ratio=self.crop_to_aspect_ratio,
            )
        scale = np.asarray(self.scale, np.float32).reshape(1, 1, 1, -1)
        offset = np.asarray(self.offset, np.float32).reshape(1, 1, 1, -1)
        return ops.cast(x, "float32") * scale + offset


def _clean(config: dict) -> dict:
    """A layer config as keyword arguments: without the name, trainable flag and dtype policy."""
    return {k: v for k, v in config.items() if k not in ("name", "trainable", "dtype")}


def _tuples(config: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


@dataclass(frozen=True)
class HubModel:
    """How to build one keras-hub family's per-frame feature network.

    ``family``: "clip", "siglip", "dinov2" or "videoprism"; ``preset``: the keras-hub preset name its
    pretrained weights come from ("" for a folder entry); ``arch``: the architecture's hyper-parameters as
    JSON (CLIP: the vision encoder's keyword arguments and ``projection_dim``; SigLIP: the vision encoder's;
    DINOv2 and VideoPrism: the backbone's); ``folder``: the preset folder of a ``hub:DIR`` entry (its
    weights are the default).
    """

    family: str
    preset: str
    arch: str
    folder: str | None = None

    @property
    def hyper(self) -> dict:
        return json.loads(self.arch)

    @property
    def clip_frames(self) -> int:
        """Consecutive frames the network embeds at once: VideoPrism's ``num_frames``, 1 for image families."""
        return int(self.hyper["num_frames"]) if self.family == "videoprism" else 1

    # ---------------------------------------------------------------- building
    def _feature_model(self, keras_hub, parts: dict | None = None):
        """The functional (images -> feature) model, from ``parts`` (layers of a loaded preset) or new layers."""
        import keras

        hyper = self.hyper
        models = keras_hub.models
        if self.family == "clip":
            vision = _tuples(hyper["vision_encoder"])
            encoder = parts["encoder"] if parts else models.CLIPVisionEncoder(**vision)
            projection = (
                parts["projection"]
                if parts
                else keras.layers.Dense(hyper["projection_dim"], use_bias=False, name="vision_projection")
            )
            images = keras.Input(tuple(vision["image_shape"]), name="images")
            features = projection(encoder({"images": images})[:, 0, :])  # CLIPVisionPooler: the class token
        elif self.family == "siglip":
            vision = _tuples(hyper["vision_encoder"])
            encoder = parts["encoder"] if parts else models.SigLIPVisionEncoder(**vision)
            images = keras.Input(tuple(vision["image_shape"]), name="images")
            features = encoder({"images": images})
        elif self.family == "dinov2":
            config = _tuples(hyper)
            encoder = parts["encoder"] if parts else models.DINOV2Backbone(**config)
            images = keras.Input(tuple(config["image_shape"]), name="images")
            features = encoder({"images": images})[:, 0, :]  # the CLS token, after the final layer norm
        elif self.family == "videoprism":
            config = _tuples(hyper)
            encoder = parts["encoder"] if parts else models.VideoPrismBackbone(**config)
            images = keras.Input((int(config["num_frames"]), *config["image_shape"]), name="images")
            # (chunk, frames, patches, hidden) -> each frame's mean over its patches: (chunk, frames, hidden)
            features = keras.ops.mean(encoder(images), axis=2)
        elif self.family == POOLED:  # any other keras-hub image backbone: its output, pooled to one vector
            # the config without its dtype policy: built under the current one (--precision)
            config = {k: v for k, v in hyper.items() if k != "image_shape"}
            config["config"] = {k: v for k, v in hyper["config"].items() if k != "dtype"}
            encoder = parts["encoder"] if parts else keras.saving.deserialize_keras_object(config)
            images = keras.Input(tuple(hyper["image_shape"]), name="images")
            features = _pool(encoder(images), keras)
        else:
            raise BackboneError(f"featpipe does not know the keras-hub family '{self.family}'.")
        return keras.Model(images, features, name=f"{self.family}_frame_features")

    def build(self, weights: str | None, input_shape: tuple[int, int, int]):
        """The architecture with keras' own random init (``weights`` None); the input is the preset's size
        (the entry's image converter resizes frames of any --size to it)."""
        if weights is not None:
            raise BackboneError(f"build() takes weights None here, got {weights!r}; use load().")
        return self._feature_model(import_keras_hub())

    def load(self, weights: str, seed: int):
        """The feature network with ``weights``: "none" (deterministic random), "imagenet" (the preset's
        pretrained weights, downloaded once by keras-hub) or a local preset folder."""
        keras_hub = import_keras_hub()
        if weights == "none":
            import keras

            keras.utils.set_random_seed(seed)
            model = self._feature_model(keras_hub)
            deterministic_hub_init(model, seed)
            return model
        source = self.preset if weights == "imagenet" else weights
        if weights != "imagenet":
            check_preset_folder(Path(weights))
        elif not source:
            raise BackboneError("This keras-hub folder backbone has no named preset; pass --weights none or a folder.")
        try:
            full = keras_hub.models.Backbone.from_preset(source)
        except Exception as exc:  # keras-hub raises plain exceptions for a failed download or a bad folder
            hint = (
                f"Without internet, download the preset '{source}' elsewhere, copy its folder here and pass "
                f"--weights FOLDER, or pass --weights none for a deterministic random network."
                if weights == "imagenet"
                else "Pass a folder that keras-hub's save_to_preset wrote (config.json and model.weights.h5)."
            )
            raise BackboneError(f"Could not load the keras-hub preset '{source}' ({exc}). {hint}") from exc
        family = FAMILIES.get(type(full).__name__, POOLED)
        if family != self.family:
            raise BackboneError(
                f"The preset '{source}' is a {type(full).__name__}, not the {self.family} family this backbone needs."
            )
        parts = {"encoder": full if family in ("dinov2", "videoprism", POOLED) else full.vision_encoder}
        if family == "clip":
            parts["projection"] = full.vision_projection
        if family != POOLED and not _matches(self.hyper, _arch_from_config(family, full.get_config())):
            raise BackboneError(
                f"The preset '{source}' has another architecture than this backbone's "
                f"({_arch_from_config(family, full.get_config())} is not {self.hyper}); use it as "
                f"--backbone hub:{source} instead."
            )
        model = self._feature_model(keras_hub, parts)
        return model


def deterministic_hub_init(model, seed: int) -> None:
    """Values that depend on ``seed`` alone, drawn by NumPy in weight order (the same bytes in every process).

    Every float variable that the architecture does not initialise to one constant (layer-norm scales and
    offsets, zero biases, layer scales and mask tokens keep theirs) is redrawn: kernels from N(0, 1/fan_in)
    (LeCun), so attention is not uniform and each frame's feature depends on its content; embeddings, class
    tokens and probes from N(0, 0.02), the ViT init. Integer buffers (position ids) stay.
    """
    from keras import ops

    rng = np.random.default_rng(seed)
    for variable in model.weights:
        if not str(variable.dtype).startswith("float"):
            continue
        value = np.asarray(ops.convert_to_numpy(variable))
        if value.size and np.all(value == value.flat[0]):
            continue  # a constant init (ones, zeros, a layer scale): the architecture's own
        std = _RANDOM_STD
        if str(variable.path).endswith("kernel") and value.ndim >= 2:
            std = 1.0 / np.sqrt(_fan_in(value.shape))
        variable.assign(rng.normal(0.0, std, value.shape).astype(np.float32))


def _fan_in(shape: tuple[int, ...]) -> int:
    """Inputs per output of a kernel: a convolution's (kh, kw, cin, cout) and a dense (in, out) kernel, an
    attention output projection (heads, head_dim, hidden), or a query/key/value one (hidden, heads, head_dim)."""
    if len(shape) == 3 and shape[0] * shape[1] != shape[2]:
        return int(shape[0])
    return int(np.prod(shape[:-1]))


def _arch_from_config(family: str, config: dict) -> dict:
    """The hyper-parameters :class:`HubModel` builds from, out of a backbone's config (``config.json``'s
    "config", or ``get_config()`` of a loaded backbone)."""
    if family in ("dinov2", "videoprism"):
        return _clean(config)
    arch = {"vision_encoder": _clean(config["vision_encoder"]["config"])}
    if family == "clip":
        arch["projection_dim"] = int(config["projection_dim"])
    return arch


def _matches(expected, actual) -> bool:
    """Whether ``actual`` has every value of ``expected`` (lists and tuples alike; extra keys allowed)."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(k in actual and _matches(v, actual[k]) for k, v in expected.items())
    if isinstance(expected, (list, tuple)):
        return isinstance(actual, (list, tuple)) and list(map(str, expected)) == list(map(str, actual))
    return expected == actual


# ------------------------------------------------------------------------ hub:PRESET and hub:DIR


def is_preset_name(ref: str) -> bool:
    """Whether ``hub:REF`` names a keras-hub preset (a built-in name such as ``clip_vit_base_patch16``, or a
    ``kaggle://``, ``hf://`` handle) rather than a local folder (a path: it exists, or has a separator)."""
    if "://" in ref:
        return True
    return not (ref.startswith(("~", ".")) or "/" in ref or "\\" in ref or Path(ref).expanduser().exists())


def preset_spec(name: str) -> tuple[HubModel, ImageConverterSpec, int]:
    """What the keras-hub preset ``name`` holds: its config and image converter, fetched by keras-hub (downloaded
    once into its cache, like the pretrained weights, which :meth:`HubModel.load` fetches as "imagenet")."""
    import_keras_hub(f"--backbone hub:{name}")
    from keras_hub.src.utils.preset_utils import get_file

    try:
        files = [Path(get_file(name, file)) for file in ("config.json", "image_converter.json")]
    except Exception as exc:  # keras-hub raises ValueError for an unknown name, network errors for a failed download
        raise BackboneError(
            f"Could not fetch the keras-hub preset '{name}' ({str(exc).splitlines()[0]}). Check the name "
            "(keras_hub.models.Backbone.presets lists the built-in ones); without internet, download the preset "
            "elsewhere, copy its folder here and pass --backbone hub:FOLDER."
        ) from exc
    model, converter, dim = folder_spec(files[0].parent, files[1])
    return HubModel(model.family, name, model.arch), converter, dim


# ------------------------------------------------------------------------ local preset folders


def check_preset_folder(folder: Path) -> Path:
    if not folder.is_dir():
        raise BackboneError(
            f"'{folder}' is not a folder: --weights (and --backbone hub:DIR) take a keras-hub preset folder here."
        )
    if not (folder / "config.json").is_file():
        raise BackboneError(
            f"'{folder}' has no config.json: it is not a keras-hub preset folder (save_to_preset writes config.json, "
            "model.weights.h5 and the converter's JSON)."
        )
    return folder


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BackboneError(f"Cannot read '{path}' as JSON ({exc}); is this a keras-hub preset folder?") from exc


def folder_spec(folder: str | Path, converter_file: Path | None = None) -> tuple[HubModel, ImageConverterSpec, int]:
    """What a preset folder holds: the model, its image converter (``converter_file``, default the folder's
    image_converter.json) and the feature size. From its JSON alone (no keras-hub import) for the families
    featpipe knows; another image backbone is built once to learn its pooled output's size."""
    folder = check_preset_folder(Path(folder).expanduser().resolve())
    config = _read_json(folder / "config.json")
    class_name = config.get("class_name", "")
    family = FAMILIES.get(class_name)
    converter_file = converter_file or folder / "image_converter.json"
    if family is None:
        return _pooled_spec(folder, config, converter_file)
    arch = _arch_from_config(family, config.get("config", {}))
    if family == "videoprism" and int(arch.get("num_text_layers") or 0) > 0:
        raise BackboneError(
            f"The VideoPrism preset in '{folder}' has a text encoder (a video-text 'lvt' preset); featpipe takes "
            "a video-only VideoPrism preset (num_text_layers 0), such as videoprism_public_v1_base."
        )
    vision = arch if family in ("dinov2", "videoprism") else arch["vision_encoder"]
    dim = int(arch.get("projection_dim", vision["hidden_dim"]))
    converter = _converter(folder, converter_file)
    model = HubModel(family, "", json.dumps(arch, sort_keys=True), str(folder))
    return model, converter, dim


def _converter(folder: Path, converter_file: Path) -> ImageConverterSpec:
    if not converter_file.is_file():
        raise BackboneError(
            f"'{folder}' has no image_converter.json: featpipe needs the preset's own image converter "
            "(save it into the folder with the converter's save_to_preset)."
        )
    return ImageConverterSpec.from_config(_read_json(converter_file).get("config", {}))


def _pool(output, keras):
    """One vector per image from a backbone's output: a feature map (B, H, W, C) averaged over space, tokens
    (B, N, C) averaged over tokens, a vector (B, C) as it is."""
    if isinstance(output, dict):
        raise BackboneError(
            f"This keras-hub backbone returns several outputs ({', '.join(output)}); featpipe needs one image "
            "feature: use a preset of an image backbone."
        )
    return keras.ops.mean(output, axis=tuple(range(1, len(output.shape) - 1))) if len(output.shape) > 2 else output


def _pooled_spec(folder: Path, config: dict, converter_file: Path) -> tuple[HubModel, ImageConverterSpec, int]:
    """Another keras-hub image backbone: its serialized config (built by keras-hub) and the pooled output's size
    (learned by building the architecture once: it is not in the JSON)."""
    class_name = config.get("class_name", "")
    if not class_name.endswith("Backbone") or "config" not in config:
        raise BackboneError(
            f"The preset in '{folder}' is a {class_name or 'model of unknown class'}, not a keras-hub backbone; "
            "hub:PRESET takes a backbone's preset (config.json of a ...Backbone)."
        )
    converter = _converter(folder, converter_file)
    arch = dict(config)
    arch["image_shape"] = [*converter.image_size, 3]
    model = HubModel(POOLED, "", json.dumps(arch, sort_keys=True), str(folder))
    return model, converter, _pooled_dim(model.arch)


@functools.lru_cache(maxsize=16)
def _pooled_dim(arch: str) -> int:
    model = HubModel(POOLED, "", arch)._feature_model(import_keras_hub("--backbone hub:PRESET"))
    return int(model.output.shape[-1])


# ------------------------------------------------------------------------ the named presets
# The architectures of the presets featpipe names, as keras-hub's conversion scripts build them from the
# original configs (openai/clip-vit-base-patch16, openai/clip-vit-large-patch14, facebook/dinov2-base,
# google/siglip2-base-patch16-224, and google-research/videoprism's videoprism_v1_base at 16 frames of 288 px):
# `--weights none` builds them with no download. The image converters likewise (VideoPrism's: 288 px bilinear
# with antialiasing, x / 255, no offset).

_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _normalisation(mean, std) -> dict[str, Any]:
    return {"scale": tuple(1.0 / 255.0 / s for s in std), "offset": tuple(-m / s for m, s in zip(mean, std))}


NAMED: dict[str, tuple[HubModel, ImageConverterSpec, int]] = {
    "clip-b16": (
        HubModel(
            "clip",
            "clip_vit_base_patch16",
            json.dumps(
                {
                    "vision_encoder": {
                        "patch_size": 16,
                        "hidden_dim": 768,
                        "num_layers": 12,
                        "num_heads": 12,
                        "intermediate_dim": 3072,
                        "intermediate_activation": "quick_gelu",
                        "image_shape": [224, 224, 3],
                    },
                    "projection_dim": 512,
                },
                sort_keys=True,
            ),
        ),
        ImageConverterSpec((224, 224), **_normalisation(_CLIP_MEAN, _CLIP_STD), interpolation="bicubic"),
        512,
    ),
    "clip-l14": (
        HubModel(
            "clip",
            "clip_vit_large_patch14",
            json.dumps(
                {
                    "vision_encoder": {
                        "patch_size": 14,
                        "hidden_dim": 1024,
                        "num_layers": 24,
                        "num_heads": 16,
                        "intermediate_dim": 4096,
                        "intermediate_activation": "quick_gelu",
                        "image_shape": [224, 224, 3],
                    },
                    "projection_dim": 768,
                },
                sort_keys=True,
            ),
        ),
        ImageConverterSpec((224, 224), **_normalisation(_CLIP_MEAN, _CLIP_STD), interpolation="bicubic"),
        768,
    ),
    "siglip2-b16": (
        HubModel(
            "siglip",
            "siglip2_base_patch16_224",
            json.dumps(
                {
                    "vision_encoder": {
                        "patch_size": 16,
                        "hidden_dim": 768,
                        "num_layers": 12,
                        "num_heads": 12,
                        "intermediate_dim": 3072,
                        "intermediate_activation": "gelu_approximate",
                        "layer_norm_epsilon": 1e-6,
                        "image_shape": [224, 224, 3],
                    }
                },
                sort_keys=True,
            ),
        ),
        ImageConverterSpec(
            (224, 224),
            **_normalisation((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
            interpolation="bicubic",
            antialias=True,
            crop_to_aspect_ratio=False,
        ),
        768,
    ),
    "dinov2-b14": (
        HubModel(
            "dinov2",
            "dinov2_base",
            json.dumps(
                {
                    "patch_size": 14,
                    "num_layers": 12,
                    "hidden_dim": 768,
                    "num_heads": 12,
                    "intermediate_dim": 3072,
                    "layer_scale_init_value": 1.0,
                    "num_register_tokens": 0,
                    "use_mask_token": True,
                    "use_swiglu_ffn": False,
                    "dropout_rate": 0.0,
                    "drop_path_rate": 0.0,
                    "image_shape": [518, 518, 3],
                    "position_embedding_shape": [518, 518],
                    "antialias_in_interpolation": False,
                    "apply_layernorm": False,
                },
                sort_keys=True,
            ),
        ),
        ImageConverterSpec((518, 518), **_normalisation(_IMAGENET_MEAN, _IMAGENET_STD), interpolation="bicubic"),
        768,
    ),
    "videoprism-b": (
        HubModel(
            "videoprism",
            "videoprism_public_v1_base",
            json.dumps(
                {
                    "num_frames": 16,
                    "patch_size": 18,
                    "hidden_dim": 768,
                    "intermediate_dim": 3072,
                    "num_heads": 12,
                    "num_spatial_layers": 12,
                    "num_temporal_layers": 4,
                    "num_auxiliary_layers": 0,
                    "vocabulary_size": 0,
                    "num_text_layers": 0,
                    "attention_logit_soft_cap": 50.0,
                    "layer_norm_epsilon": 1e-6,
                    "image_shape": [288, 288, 3],
                },
                sort_keys=True,
            ),
        ),
        ImageConverterSpec((288, 288), (1 / 255.0,) * 3, (0.0,) * 3, interpolation="bilinear", antialias=True),
        768,
    ),
}
