"""Weights and fingerprints: building a registry entry's network with the weights asked for.

Weights:
  * ``imagenet``: Keras downloads them once into ~/.keras/models;
  * ``none``: a random network that is DETERMINISTIC for a given seed, in every process
    (so a resumed extraction never mixes two networks; see :mod:`featpipe.backbones.calibration`);
  * a path to a local weights file (for machines without internet).
A fingerprint of the weight values is recorded in the cache so that mismatches are detected.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from featpipe.backbones.calibration import deterministic_init
from featpipe.backbones.registry import WEIGHTS_IMAGENET, WEIGHTS_NONE, Backbone, check_size
from featpipe.errors import BackboneError
from featpipe.runtime.keras_import import import_keras


def weights_label(weights: str | os.PathLike, backbone: Backbone | None = None) -> str:
    """Normalise the --weights value to what the cache records: 'imagenet', 'none' or an absolute path.

    For a ``hub:DIR`` entry, 'imagenet' (the default) means the folder's own weights: its path is recorded.
    """
    text = str(weights)
    if text.lower() == WEIGHTS_IMAGENET and backbone is not None and backbone.default_weights:
        return backbone.default_weights
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


def build_model(backbone: Backbone, size: int, weights: str = WEIGHTS_IMAGENET, seed: int = 0):
    """Build the frozen feature network: include_top=False, global average pooling.

    Returns a Keras model mapping preprocessed (B, size, size, 3) float32 to (B, feature_dim).
    """
    keras = import_keras()

    check_size(backbone, size)
    input_shape = (size, size, 3)
    label = weights_label(weights, backbone)
    if backbone.load is not None:  # a keras-hub entry: it loads "none", its preset's weights or a preset folder
        model = backbone.load(label, seed)
        model.trainable = False
        return model
    if label == WEIGHTS_NONE:
        keras.utils.set_random_seed(seed)
        model = backbone.build(None, input_shape)
        deterministic_init(model, backbone, size, seed)
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
