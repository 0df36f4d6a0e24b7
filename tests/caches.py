"""Small synthetic caches the training tests share (written with CacheWriter: no video, no backbone)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featpipe.cache.schema import CacheConfig, ClipRecord
from featpipe.cache.writer import CacheWriter


def synthetic_cache(path: Path, splits=("train", "val", "test"), classes=("a", "b"), n=24, nan=False) -> Path:
    t, d = 4, 6
    rng = np.random.default_rng(0)
    w = CacheWriter(path, CacheConfig("vgg16", "none", "fp", 32, t, "uniform", "float32", (d,), tuple(classes)))
    for i in range(n):
        label = i % len(classes)
        feats = rng.normal(label, 1, (t, d)).astype(np.float32)
        if nan and i == 3:
            feats[1, 2] = np.nan
        w.append(ClipRecord(f"v{i:03d}.mp4", label, splits[i % len(splits)], t, feats, np.ones(t, bool)))
    w.finalize()
    return path


def tiny_cache(path: Path, n: int = 48, val_every: int = 6) -> Path:
    """4 classes told apart by a rising or falling feature 0 (order) and feature 1 (pair)."""
    t, d = 4, 6
    rng = np.random.default_rng(0)
    names = ("a", "b", "c", "d")
    w = CacheWriter(path, CacheConfig("vgg16", "none", "fp", 32, t, "uniform", "float32", (d,), names))
    for i in range(n):
        label = i % 4
        feats = rng.normal(0, 0.3, (t, d)).astype(np.float32)
        feats[:, 0] += np.linspace(-1, 1, t) * (1 if label % 2 else -1)
        feats[:, 1] += 1.0 if label >= 2 else -1.0
        split = "test" if i % 8 == 7 else ("val" if i % val_every == 0 else "train")
        w.append(ClipRecord(f"v{i:03d}.mp4", label, split, t, feats, np.ones(t, bool)))
    w.finalize()
    return path
