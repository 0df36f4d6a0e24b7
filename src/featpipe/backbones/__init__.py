"""Frozen image backbones: the registry, weights and fingerprints, the NumPy calibration, frame sources."""
