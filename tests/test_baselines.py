"""Tests for featpipe.training.baselines: the linear probe the default heads are held to."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from featpipe.cache.schema import CacheConfig, ClipRecord
from featpipe.cache.writer import CacheWriter
from featpipe.errors import FeatpipeError
from featpipe.training.baselines import linear_probe, segment_means
from featpipe.training.heads.layers import SegmentMeans


def order_cache(path: Path, n: int = 64, t: int = 12, d: int = 5) -> Path:
    """Two classes with the same frames, in opposite orders (a ramp up or down one feature), ragged lengths."""
    rng = np.random.default_rng(0)
    config = CacheConfig("vgg16", "none", "fp", 32, t, "uniform", "float32", (d,), ("down", "up"))
    w = CacheWriter(path, config)
    for i in range(n):
        label, length = i % 2, int(rng.integers(3, t + 1))
        feats = np.zeros((t, d), np.float32)
        ramp = np.linspace(-1, 1, length)
        feats[:length, 0] = ramp if label else ramp[::-1]
        feats[:length] += rng.normal(0, 0.3, (length, d))
        mask = np.arange(t) < length
        w.append(ClipRecord(f"v{i:03d}.mp4", label, ("train", "train", "val", "test")[i // 2 % 4], t, feats, mask))
    w.finalize()
    return path


def test_segment_means_follow_the_models_segment_rule_for_short_empty_and_padded_clips():
    rng = np.random.default_rng(0)
    lengths = (0, 1, 3, 7, 10)
    x = rng.normal(size=(len(lengths), 10, 4)).astype(np.float32)
    mask = np.arange(10)[None, :] < np.array(lengths)[:, None]
    x[~mask] = 1e6  # padded garbage must not count
    ours = segment_means(x, mask, 4)
    layer = np.asarray(SegmentMeans(4)(np.where(mask[..., None], x, 0), mask=mask))
    np.testing.assert_allclose(ours, layer, rtol=1e-5, atol=1e-5)
    assert not ours[0].any() and np.allclose(ours[1], x[1, 0])


def test_the_linear_probe_sees_order_through_its_segments_and_one_segment_cannot(tmp_path):
    cache = order_cache(tmp_path / "order.h5")
    ordered = linear_probe(cache, segments=4)
    blind = linear_probe(cache, segments=1)
    assert ordered["accuracy"] == 1.0 and ordered["n"] == 16
    assert blind["accuracy"] <= 0.75, "the mean of a clip does not tell a ramp from its reverse"


def test_bad_probe_arguments_are_sentences(tmp_path):
    cache = order_cache(tmp_path / "order.h5", n=16)
    with pytest.raises(FeatpipeError, match="segments must be a whole number"):
        linear_probe(cache, segments=0)
    with pytest.raises(FeatpipeError, match="c must be a positive number"):
        linear_probe(cache, c=0)
