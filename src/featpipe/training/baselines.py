"""Simple baselines on a feature cache: what a trained head should at least match.

:func:`linear_probe` is scikit-learn's L2-regularised logistic regression on the masked means of
``segments`` temporal segments of the standardised real frames (the ``segments`` head's input),
fitted on train + val. It takes a second, has no epochs to choose, and is order-aware through its
segments. ``bench/heads_table.py`` prints it beside every head, and the test suite holds the
default heads to it on the hard sample set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featpipe.errors import FeatpipeError
from featpipe.training.inputs import CacheIndex, feature_stats, load_rows, open_index, resolve_cache


def segment_means(features: np.ndarray, mask: np.ndarray, segments: int) -> np.ndarray:
    """``(B, T, D)`` features and ``(B, T)`` mask -> ``(B, segments, D)`` masked segment means.

    The rule of :class:`featpipe.training.heads.layers.SegmentMeans`: segment ``i`` of ``n`` real frames covers
    ``[floor(i n / K), floor((i + 1) n / K))`` widened to one frame, so a clip shorter than K
    frames repeats frames; a clip without real frames gives zeros.
    """
    out = np.zeros((len(features), segments, features.shape[-1]), np.float32)
    for b, n in enumerate(np.asarray(mask, bool).sum(axis=1)):
        for i in range(segments):
            lo = i * n // segments
            hi = max((i + 1) * n // segments, min(lo + 1, n))
            if hi > lo:
                out[b, i] = features[b, lo:hi].mean(axis=0)
    return out


def _design(index: CacheIndex, rows: np.ndarray, mean, var, segments: int) -> np.ndarray:
    x, _ = load_rows(index, rows)
    z = (x["features"] - mean) / np.sqrt(np.maximum(var, 1e-6))
    return segment_means(z, x["mask"], segments).reshape(len(rows), -1)


def linear_probe(
    cache: str | Path | None = None, segments: int = 4, c: float = 0.05, cache_dir: str | Path = "cache"
) -> dict:
    """Fit the probe on train + val of ``cache`` and return its test metrics
    (:func:`featpipe.runs.metrics.compute_metrics`); without a test split, fit on train and score val.

    ``c`` is scikit-learn's inverse regularisation strength: 0.05 is strong, as few clips need.
    """
    from sklearn.linear_model import LogisticRegression  # lazy: scikit-learn

    from featpipe.runs.metrics import compute_metrics

    index = open_index(resolve_cache(cache, cache_dir))
    if len(index.config.feature_shape) != 1:
        raise FeatpipeError(
            f"The linear probe reads feature vectors; '{index.path}' holds raw frames of shape "
            f"{index.config.feature_shape}: extract with a CNN backbone."
        )
    if not isinstance(segments, int) or isinstance(segments, bool) or segments < 1:
        raise FeatpipeError(f"segments must be a whole number >= 1; got {segments!r}.")
    if not c > 0:
        raise FeatpipeError(f"c must be a positive number; got {c!r}.")
    train_rows, val_rows, test_rows = (index.rows(s) for s in ("train", "val", "test"))
    if len(test_rows):  # nothing to stop early: val is training data too
        fit_rows, score_rows = np.concatenate([train_rows, val_rows]), test_rows
    else:
        fit_rows, score_rows = train_rows, val_rows
    if len(set(index.labels[train_rows].tolist())) < 2 or not len(score_rows):
        raise FeatpipeError(f"'{index.path}' needs a train split with two classes and a test or val split.")
    mean, var = feature_stats(index, train_rows)
    probe = LogisticRegression(C=c, max_iter=2000)
    probe.fit(_design(index, fit_rows, mean, var, segments), index.labels[fit_rows])
    probabilities = np.zeros((len(score_rows), len(index.class_names)))
    probabilities[:, probe.classes_] = probe.predict_proba(_design(index, score_rows, mean, var, segments))
    return compute_metrics(index.labels[score_rows], probabilities, index.class_names)
