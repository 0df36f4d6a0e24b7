"""Frozen image backbones: the registry, weights and fingerprints, the NumPy calibration, frame sources.

The registry's public names are importable from here (``from featpipe.backbones import Backbone,
register_backbone``, docs/python-api.md); importing them loads no Keras.
"""

from featpipe.backbones.registry import REGISTRY, Backbone, get_backbone, register_backbone

__all__ = ["REGISTRY", "Backbone", "get_backbone", "register_backbone"]
