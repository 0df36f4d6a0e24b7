"""`featpipe evaluate`: metrics of a trained run on one split of a cache.

The run and the cache are checked against each other first: preprocessing must match, a split
that holds clips the run was trained on is refused, and a cache that changed since training
(another fingerprint) is scored with a :class:`featpipe.errors.RunWarning`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from featpipe.cache.schema import APPEND_KEYS, CacheConfig, read_times
from featpipe.errors import CacheError, FeatpipeError, RunWarning
from featpipe.options import check_int
from featpipe.runs.rundir import RunInfo, cache_change_warning, load_run, overlap_with_training
from featpipe.training.fit import predict_rows
from featpipe.training.inputs import cache_fingerprint, check_finite, open_index


def check_cache_matches(info: RunInfo, cache_config: CacheConfig, cache: Path) -> None:
    """Refuse a cache whose preprocessing (or classes/feature shape) differ from the run's.

    Storage dtype may differ: float16 vs float32 does not change what the features are.
    """
    run_config = CacheConfig.from_attrs(info.cache_attrs)
    keys = [k for k in APPEND_KEYS if k != "dtype"]
    diffs = run_config.differences(cache_config, keys, mine_label="in the run")
    if diffs:
        raise CacheError(
            f"The cache '{cache}' was not made the way this run's training cache was ({'; '.join(diffs)}). "
            f"Evaluate on a cache extracted with the run's settings."
        )


def evaluate(
    run: str | Path = "models/latest", split: str = "test", cache: str | Path | None = None, batch_size: int = 64
) -> dict:
    """Metrics of a run on ``split`` of ``cache`` (default: the run's own cache).

    Returns featpipe.runs.metrics.compute_metrics' dict plus ``split``, ``run``, ``cache`` and ``warnings``
    (the lines also issued as RunWarning). Raises FeatpipeError when the split holds clips the run
    was trained on (any split but "train"), or the cache's preprocessing differs from the run's.
    """
    check_int("batch_size", batch_size, 1, 65_536)
    run_dir, info, model = load_run(run)
    cache_path = Path(cache) if cache is not None else Path(info.cache)
    with open_index(cache_path) as index:  # one file read throughout, whatever replaces the cache meanwhile
        return _evaluate(run_dir, info, model, index, cache_path, split, batch_size)


def _evaluate(run_dir, info, model, index, cache_path: Path, split: str, batch_size: int) -> dict:
    return evaluate_rows(run_dir, info, model, index, cache_path, split, batch_size, stacklevel=4)[0]


def evaluate_rows(
    run_dir, info, model, index, cache_path: Path, split: str, batch_size: int = 64, stacklevel: int = 2
) -> tuple[dict, np.ndarray, np.ndarray]:
    """What :func:`evaluate` computes, with its per-clip inputs: (metrics, the split's cache rows, their
    probabilities (n, C)). ``featpipe report`` shows the clips behind the metrics from these."""
    from featpipe.runs.metrics import compute_metrics  # lazy: scikit-learn

    check_cache_matches(info, index.config, cache_path)
    rows = index.rows(split)
    if not len(rows):
        present = ", ".join(sorted(set(index.splits.tolist())))
        raise FeatpipeError(
            f"The cache '{cache_path}' has no clips in the '{split}' split (splits present: {present})."
        )
    notes = []
    if split != "train":  # scoring the training split is asked for by name; any other split must be unseen
        if info.train_clips is None:
            notes.append(
                f"warning: '{run_dir}' was trained before featpipe recorded training clips, so the "
                f"'{split}' split cannot be checked for clips the run was trained on."
            )
        overlap_with_training(info, index.videos[rows], split, cache_path)
    change = cache_change_warning(info, cache_path, cache_fingerprint(index))
    if change:
        notes.append(change)
    for note in notes:
        warnings.warn(note, RunWarning, stacklevel=stacklevel)
    check_finite(index, rows)
    probs = predict_rows(model, index, rows, batch_size)
    if not np.isfinite(probs).all():
        raise FeatpipeError(
            f"The model produced NaN probabilities on '{cache_path}'; check the cache for NaN features."
        )
    metrics = compute_metrics(index.labels[rows], probs, index.class_names)
    metrics.update(split=split, run=str(run_dir), cache=str(cache_path), warnings=notes)
    with index.opened() as f:
        durations = read_times(f, rows)[1]
    recorded = np.isfinite(durations)
    # seconds of video evaluated (None: the cache predates frame times), and over how many clips it is known
    metrics.update(
        video_seconds=round(float(durations[recorded].sum()), 3) if recorded.any() else None,
        video_seconds_clips=int(recorded.sum()),
    )
    return metrics, rows, probs
