"""What `featpipe tune` searches and how one configuration is scored.

:class:`TuneOptions` (everything tune can be told); :func:`plan_fits` (repeated seeds on train -> val, or
stratified folds over train + val); the search space (:func:`suggest`, and :func:`defaults_as_trial`, the
trial that reproduces `featpipe train`'s defaults for a head); and :func:`score_config`, which fits one
configuration on every fit of the plan with train()'s model, optimiser and early stopping.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featpipe.errors import FeatpipeError, OptionError
from featpipe.names import CV_MODES, HEAD_NAMES, IMAGE_HEADS
from featpipe.options import check_choice, check_dir_option, check_float, check_int, split_list_options
from featpipe.runs.tracking import require_mlflow, tensorboard_callback
from featpipe.runtime import signals
from featpipe.runtime.keras_import import import_keras
from featpipe.training.fit import compile_model, interrupt_check
from featpipe.training.inputs import pca_from_frames
from featpipe.training.options import TrainOptions, head_config, resolve_defaults

MIN_VAL_PER_CLASS = 10  # fewer val clips per class than this: k-fold on train + val instead of repeated seeds
SEARCH_HEADS = ("gru", "lstm", "segments")
# Settings every trial shares (the search space covers the rest). A trial is a few short fits:
# the patience is shorter than train()'s default to keep a 20-trial search within minutes on 2 cores.
TRIAL_EPOCHS = 60
TRIAL_PATIENCE = 10


@dataclass(frozen=True)
class TuneOptions:
    """Everything `featpipe tune` can be told."""

    cache: str | Path | None = None  # cache file; None = the single .h5 in cache_dir
    cache_dir: str | Path = "cache"
    trials: int | None = 20  # finished trials to reach (counting earlier runs of the same study); None = no limit
    time_budget: float | None = None  # seconds for the search (this run); None = no limit
    jobs: int = 1  # worker processes sharing the study
    heads: tuple[str, ...] = SEARCH_HEADS
    cv: str = "auto"  # "auto", "folds" (stratified k-fold on train+val) or "seeds" (repeated seeds on train -> val)
    folds: int = 3
    seeds: int = 2
    seed: int = 0  # sampler seed and base seed of the fits
    out: str | Path | None = None  # where study.db and the leaderboard go; default <models_dir>/tune-<cache stem>
    models_dir: str | Path = "models"
    retrain: bool = True  # retrain the best configuration as a run directory
    epochs: int = TRIAL_EPOCHS  # per fit of a trial (the retrained best uses train()'s defaults)
    patience: int = TRIAL_PATIENCE
    quiet: bool = False
    mlflow: str | None = None  # MLflow tracking URI: a parent run; each finished trial and the retrained best: children
    mlflow_experiment: str = "featpipe"
    tensorboard: str | Path | None = None  # TensorBoard events: <tensorboard>/trial-N/fit-K, the retrained best's run

    def __post_init__(self) -> None:
        split_list_options(self)  # heads="gru,lstm" as --heads gru,lstm
        check_dir_option("tensorboard", self.tensorboard, optional=True)
        require_mlflow(self.mlflow)  # before any work: the missing install in one sentence
        if not isinstance(self.mlflow_experiment, str) or not self.mlflow_experiment.strip():
            raise OptionError("mlflow_experiment", f"must be a non-empty name; got {self.mlflow_experiment!r}.")
        check_int("trials", self.trials, 1, 100_000, optional=True)
        check_float("time_budget", self.time_budget, 0.0, 30 * 86400.0, low_open=True, optional=True)
        if self.trials is None and self.time_budget is None:
            raise OptionError("trials", "or time_budget must be given, or the search would never end.")
        check_int("jobs", self.jobs, 1, 256)
        check_choice("cv", self.cv, CV_MODES)
        check_int("folds", self.folds, 2, 20)
        check_int("seeds", self.seeds, 1, 20)
        check_int("seed", self.seed, 0, 2**31 - 1)
        check_int("epochs", self.epochs, 1, 100_000)
        check_int("patience", self.patience, 1, 100_000)
        heads = self.heads
        if not heads:
            raise OptionError("heads", "must name at least one head.")
        for head in heads:
            if head not in HEAD_NAMES or head in IMAGE_HEADS:
                feature_heads = ", ".join(h for h in HEAD_NAMES if h not in IMAGE_HEADS)
                raise OptionError("heads", f"must be feature heads ({feature_heads}); got {head!r}.")


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``folds`` (train, val) position arrays over ``labels``: every position is in exactly one val
    fold, and every class is spread over the folds as evenly as its count allows (scikit-learn's
    StratifiedKFold, shuffled with ``seed``). Refuses classes with fewer clips than folds."""
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    counts = np.bincount(labels)
    present = counts[counts > 0]
    if present.min() < folds:
        raise FeatpipeError(
            f"A class has only {present.min()} clips in train + val, fewer than the {folds} folds; "
            f"pass a smaller --folds, or --cv seeds."
        )
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(tr, va) for tr, va in splitter.split(np.zeros(len(labels)), labels)]


def plan_fits(index, opts: TuneOptions) -> tuple[str, list[tuple[np.ndarray, np.ndarray, int]]]:
    """How a trial is scored: ("folds" | "seeds", [(train rows, val rows, seed), ...]) in cache rows."""
    train_rows, val_rows = index.rows("train"), index.rows("val")
    n_classes = len(index.class_names)
    mode = opts.cv
    if mode == "auto":
        mode = "seeds" if len(val_rows) >= MIN_VAL_PER_CLASS * n_classes else "folds"
    if mode == "seeds":
        if not len(val_rows):
            raise FeatpipeError(f"'{index.path}' has no val split to score repeated seeds on; use --cv folds.")
        return mode, [(train_rows, val_rows, opts.seed + s) for s in range(opts.seeds)]
    pool = np.concatenate([train_rows, val_rows])
    fits = stratified_folds(index.labels[pool], opts.folds, opts.seed)
    return mode, [(pool[tr], pool[va], opts.seed + k) for k, (tr, va) in enumerate(fits)]


# --------------------------------------------------------------------------------------------
# The search space
# --------------------------------------------------------------------------------------------


def suggest(trial, heads: tuple[str, ...], cache_frames: int) -> dict:
    """TrainOptions fields for one trial (only what differs from train()'s defaults is searched)."""
    head = trial.suggest_categorical("rnn", list(heads))
    params = {
        "rnn": head,
        "lr": trial.suggest_float("lr", 3e-4, 1e-2, log=True),
        "dropout": trial.suggest_float("dropout", 0.0, 0.6, step=0.1),
        "weight_decay": trial.suggest_categorical("weight_decay", [0.0, 1e-3, 1e-2, 1e-1]),
        "input_dropout": trial.suggest_float("input_dropout", 0.0, 0.4, step=0.1),
        "l2": trial.suggest_categorical("l2", [0.0, 0.01, 0.1, 1.0]),
    }
    if head == "segments":
        params["segments"] = trial.suggest_int("segments", 2, 6)
        params["layers"] = trial.suggest_int("segment_layers", 1, 2)
    else:  # (PCA whitening is not searched: it cost 0.06-0.18 accuracy in every measurement, see docs/training.md)
        params["units"] = trial.suggest_categorical("units", [16, 32, 64])
        params["bottleneck"] = trial.suggest_categorical("bottleneck", [0, 32, 64])
        params["shortcut"] = trial.suggest_categorical("shortcut", [0, 4])
    if cache_frames >= 8:
        half = trial.suggest_categorical("half_frames", [False, True])
        params["frames"] = cache_frames // 2 if half else None
    return {k: v for k, v in params.items() if v is not None}


# the settings of a configuration in the order people read them (describe(), tune's report.html)
SETTING_ORDER = ("rnn", "lr", "dropout", "weight_decay", "input_dropout", "l2", "units", "bottleneck", "shortcut")
SETTING_ORDER += ("segments", "layers", "frames")


def describe(params: dict) -> str:
    """A short label of a configuration: the head, then its settings."""
    parts = [params["rnn"]]
    for key in SETTING_ORDER[1:]:
        if key in params:
            value = params[key]
            parts.append(f"{key}={value:.2g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


def defaults_as_trial(head: str, cache_frames: int) -> dict:
    """Optuna params that reproduce `featpipe train --rnn head` defaults (enqueued first)."""
    d = resolve_defaults(TrainOptions(head=head))
    params = {
        "rnn": head,
        "lr": d.lr,
        "dropout": d.dropout,
        "weight_decay": d.weight_decay,
        "input_dropout": d.input_dropout,
        "l2": d.l2,
    }
    if head == "segments":
        params.update(segments=d.segments, segment_layers=d.layers)
    else:
        params.update(units=d.units, bottleneck=d.bottleneck, shortcut=d.shortcut)
    if cache_frames >= 8:
        params["half_frames"] = False
    return params


# --------------------------------------------------------------------------------------------
# Scoring one configuration
# --------------------------------------------------------------------------------------------


def _frame_stats(x: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    real = x[m].astype(np.float64)
    mean = real.mean(axis=0)
    return mean.astype(np.float32), np.maximum(real.var(axis=0), 0.0).astype(np.float32)


def score_config(
    params: dict, data: dict, fits, opts: TuneOptions, log_dir: Path | None = None
) -> tuple[list[float], list[float]]:
    """Validation accuracy and loss of ``params`` on each fit (same model, optimiser and early stopping as train()).
    ``log_dir``: TensorBoard event files of fit K into ``log_dir/fit-K``."""
    keras = import_keras()

    from featpipe.training.heads.registry import build_head  # lazy: the heads import Keras
    from featpipe.training.heads.shortcut import fit_shortcut

    topts = resolve_defaults(TrainOptions(**params))
    x, m, y, where = data["features"], data["mask"], data["labels"], data["where"]
    accs, losses = [], []
    for k, (train_rows, val_rows, seed) in enumerate(fits):
        tr, va = where[train_rows], where[val_rows]
        mean, var = _frame_stats(x[tr], m[tr])
        projection = None
        if topts.pca:
            std = np.sqrt(np.maximum(var, 1e-12))
            projection = pca_from_frames((x[tr][m[tr]].astype(np.float64) - mean) / std, topts.pca)
        frames = 0 if topts.frames in (None, x.shape[1]) else int(topts.frames)
        head = head_config(topts, frames)
        keras.utils.set_random_seed(seed)
        model = build_head(head, x.shape[2:], data["n_classes"], mean, var, pca=projection, seed=seed)
        fit_shortcut(model, [(x[tr], m[tr])], y[tr])
        compile_model(model, topts)
        stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=opts.patience, restore_best_weights=True)
        tracking = [] if log_dir is None else [tensorboard_callback(log_dir, f"fit-{k}")]
        with signals.deferred():  # a Ctrl-C is raised after the next batch, not inside TensorFlow
            model.fit(
                {"features": x[tr], "mask": m[tr]},
                y[tr],
                batch_size=topts.batch_size,
                epochs=opts.epochs,
                validation_data=({"features": x[va], "mask": m[va]}, y[va]),
                callbacks=[stop, *tracking, interrupt_check(keras)],
                verbose=0,
                shuffle=True,
            )
        loss, acc = model.evaluate({"features": x[va], "mask": m[va]}, y[va], batch_size=256, verbose=0)
        accs.append(float(acc))
        losses.append(float(loss))
        keras.backend.clear_session()
    return accs, losses


# --------------------------------------------------------------------------------------------
# Workers and the study
# --------------------------------------------------------------------------------------------
