"""`featpipe evaluate`: metrics of a trained run on one split of a cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from featpipe._quiet import import_keras
from featpipe.cache import APPEND_KEYS, CacheConfig
from featpipe.data import check_finite, open_index
from featpipe.errors import CacheError, FeatpipeError
from featpipe.train import predict_rows, resolve_run


def load_run(run: str | Path = "models/latest"):
    """(run directory, run.json as a dict, the Keras model) for a run folder or models/latest."""
    keras = import_keras()

    import featpipe.models  # noqa: F401  registers the custom layers for safe-mode loading

    run_dir = resolve_run(run)
    info = json.loads((run_dir / "run.json").read_text())
    model_path = run_dir / "model.keras"
    if not model_path.is_file():
        raise FeatpipeError(f"'{run_dir}' has no model.keras; the training run did not finish. Train again.")
    try:
        model = keras.saving.load_model(model_path)
    except (ValueError, OSError, TypeError) as exc:
        raise FeatpipeError(f"Could not load '{model_path}' ({exc}); it may be damaged or from another featpipe version.") from exc
    return run_dir, info, model


def check_cache_matches(info: dict, cache_config: CacheConfig, cache: Path) -> None:
    """Refuse a cache whose preprocessing (or classes/feature shape) differ from the run's.

    Storage dtype may differ: float16 vs float32 does not change what the features are.
    """
    run_config = CacheConfig.from_attrs(info["cache_attrs"])
    keys = [k for k in APPEND_KEYS if k != "dtype"]
    diffs = run_config.differences(cache_config, keys, mine_label="in the run")
    if diffs:
        raise CacheError(
            f"The cache '{cache}' was not made the way this run's training cache was ({'; '.join(diffs)}). "
            f"Evaluate on a cache extracted with the run's settings."
        )


def evaluate(run: str | Path = "models/latest", split: str = "test", cache: str | Path | None = None,
             batch_size: int = 64) -> dict:
    """Metrics of a run on ``split`` of ``cache`` (default: the run's own cache).

    Returns featpipe.metrics.compute_metrics' dict plus ``split``, ``run`` and ``cache``.
    """
    from featpipe.metrics import compute_metrics

    run_dir, info, model = load_run(run)
    cache_path = Path(cache) if cache is not None else Path(info["cache"])
    index = open_index(cache_path)
    check_cache_matches(info, index.config, cache_path)
    rows = index.rows(split)
    if not len(rows):
        present = ", ".join(sorted(set(index.splits.tolist())))
        raise FeatpipeError(f"The cache '{cache_path}' has no clips in the '{split}' split (splits present: {present}).")
    check_finite(index, rows)
    probs = predict_rows(model, index, rows, batch_size)
    if not np.isfinite(probs).all():
        raise FeatpipeError(f"The model produced NaN probabilities on '{cache_path}'; check the cache for NaN features.")
    metrics = compute_metrics(index.labels[rows], probs, index.class_names)
    metrics.update(split=split, run=str(run_dir), cache=str(cache_path))
    return metrics
