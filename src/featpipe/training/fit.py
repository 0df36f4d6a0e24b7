"""Fitting a head on cache rows: build and compile, fit with checkpoints, refit on train + val, predict.

:func:`fit_run` checkpoints the best epoch into the run folder and keeps what was reached when Ctrl-C or
SIGTERM lands; :func:`refit_run` trains a fresh model on train + val for the chosen epoch count;
:func:`predict_rows` scores cache rows in bounded memory (``evaluate`` uses it too).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from featpipe.backbones.registry import is_raw
from featpipe.errors import TrainingDiverged
from featpipe.names import REFIT_BELOW
from featpipe.options import check_float, check_int
from featpipe.runs import rundir as runs
from featpipe.runtime import signals
from featpipe.runtime.atomic import install
from featpipe.runtime.keras_import import import_keras
from featpipe.training.inputs import (
    IN_MEMORY_FRACTION,
    CacheIndex,
    check_finite,
    choose_stream,
    feature_stats,
    load_rows,
    pca_whitening,
    physical_memory,
)
from featpipe.training.options import MAX_L2, TrainOptions, head_config


def _class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)
    return weights


def compile_model(model, opts: TrainOptions) -> None:
    """The optimiser and loss of ``opts``: Adam, or AdamW with weight decay; label smoothing if asked."""
    keras = import_keras()

    if opts.weight_decay:
        optimizer = keras.optimizers.AdamW(learning_rate=opts.lr, weight_decay=opts.weight_decay)
    else:
        optimizer = keras.optimizers.Adam(learning_rate=opts.lr)
    if opts.label_smoothing:
        from featpipe.training.heads.layers import SparseSmoothedCrossentropy  # lazy: it imports Keras

        loss = SparseSmoothedCrossentropy(opts.label_smoothing)
    else:
        loss = "sparse_categorical_crossentropy"
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])


def _check_frames(opts: TrainOptions, index: CacheIndex) -> int:
    """The head's step count for HeadConfig.frames: 0 (all the cache's steps) or fewer than the cache holds."""
    check_int("segments", opts.segments, 1, 1000)
    for name in ("bottleneck", "pca", "pooled_steps", "shortcut"):
        check_int(name, getattr(opts, name), 0, 1 << 16)
    check_float("input_dropout", opts.input_dropout, 0.0, 1.0, high_open=True)
    check_float("weight_decay", opts.weight_decay, 0.0, 1.0)
    check_float("l2", opts.l2, 0.0, MAX_L2)
    check_float("label_smoothing", opts.label_smoothing, 0.0, 1.0, high_open=True)
    if opts.frames is None:
        return 0
    cached = index.config.frames
    check_int(
        "frames",
        opts.frames,
        1,
        cached,
        hint=f"The cache holds {cached} frames per clip; re-extract with a larger `--frames` to train on more.",
    )
    return 0 if opts.frames == cached else int(opts.frames)


@dataclass
class Splits:
    """The rows a run trains on, validates on and tests on."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    val_source: str  # how the validation rows were chosen, for run.json


@dataclass
class FitResult:
    """What fitting left behind: the best model (as predict will load it) and its history."""

    model: object
    history: list[dict]
    best_epoch: int
    streamed: bool
    interrupted: KeyboardInterrupt | None  # the KeyboardInterrupt (or Terminated) that stopped training
    val_metrics: dict | None = None  # the selected model's val metrics, kept when a refit replaced it
    refit_rows: np.ndarray | None = None  # the rows the final model was refit on (train + val); None = no refit
    diverged: str | None = None  # the loss became NaN or infinite (in words): training stopped there


def build_compiled_head(opts: TrainOptions, index: CacheIndex, train_rows: np.ndarray):
    """The compiled model, with the train split's statistics inside; and its HeadConfig."""
    keras = import_keras()

    from featpipe.training.heads.registry import build_head  # lazy: the heads import Keras
    from featpipe.training.heads.shortcut import fit_shortcut

    head = head_config(opts, _check_frames(opts, index))
    raw_frames = is_raw(index.config.backbone)  # the registry's raw entry: uint8 frames, not feature vectors
    mean = var = None
    everything = np.arange(len(index.labels))
    if raw_frames:
        check_finite(index, everything)
    else:  # one pass: statistics of the train split's real frames, and no NaN anywhere
        mean, var = feature_stats(index, train_rows, check=everything)
    keras.utils.set_random_seed(opts.seed)
    projection = None
    if opts.pca and not raw_frames:
        projection = pca_whitening(index, train_rows, mean, var, opts.pca)
    model = build_head(
        head, index.config.feature_shape, len(index.class_names), mean, var, pca=projection, seed=opts.seed
    )
    fit_shortcut(model, _chunks(index, train_rows), index.labels[train_rows])
    compile_model(model, opts)
    return model, head


def _chunks(index: CacheIndex, rows: np.ndarray, size: int = 512):
    """(features, mask) of ``rows``, ``size`` clips at a time (bounded memory on a large cache)."""
    for lo in range(0, len(rows), size):
        x, _ = load_rows(index, rows[lo : lo + size])
        yield x["features"], x["mask"]


def _fit_data(
    index: CacheIndex, opts: TrainOptions, train_rows: np.ndarray, val_rows: np.ndarray | None, streamed: bool
) -> dict:
    """``model.fit`` keyword arguments for ``train_rows`` (and ``val_rows`` as validation, when given)."""
    from featpipe.training.streaming import H5Batches

    n_classes = len(index.class_names)
    weights = _class_weights(index.labels[train_rows], n_classes) if opts.class_weight == "balanced" else None
    if streamed:
        sw = weights[index.labels[train_rows]] if weights is not None else None
        # Validation is usually small: held in memory when it fits, because Keras slows down epoch after
        # epoch when validation_data is a PyDataset (measured in bench/train_bench.py).
        validation = None
        if val_rows is not None:
            val_bytes = len(val_rows) * index.features_nbytes_f32 // max(len(index.labels), 1)
            validation = (
                load_rows(index, val_rows)
                if val_bytes <= IN_MEMORY_FRACTION * physical_memory()
                else H5Batches(index, val_rows, index.labels[val_rows], opts.batch_size, dtype=None)
            )
        # H5Batches shuffles itself (shuffled blocks of neighbouring rows, read a window of batches at a time),
        # so Keras must keep its batch order (shuffle=False). Features come in the cache's dtype: the model's
        # float32 input casts them, the same values as in memory, and a float16 cache skips a slow NumPy cast.
        # Two reader threads (h5py reads release the GIL) are enough for a few large reads per window.
        return dict(
            x=H5Batches(
                index,
                train_rows,
                index.labels[train_rows],
                opts.batch_size,
                shuffle=True,
                seed=opts.seed,
                sample_weight=sw,
                dtype=None,
                workers=2,
                use_multiprocessing=False,
                max_queue_size=16,
            ),
            validation_data=validation,
            shuffle=False,
        )
    x_train, y_train = load_rows(index, train_rows)
    validation = load_rows(index, val_rows) if val_rows is not None else None
    return dict(
        x=x_train,
        y=y_train,
        validation_data=validation,
        batch_size=opts.batch_size,
        shuffle=True,
        sample_weight=weights[y_train] if weights is not None else None,
    )


def _close(fit_data: dict) -> None:
    from featpipe.training.streaming import H5Batches

    for data in (fit_data["x"], fit_data["validation_data"]):
        if isinstance(data, H5Batches):  # streamed: close the file, drop the windows
            data.close()


def interrupt_check(keras):
    """A callback raising a Ctrl-C or SIGTERM that was recorded (see featpipe.runtime.signals) after every batch and at
    the end of every epoch. It goes last in the callback list, so an epoch's history row and checkpoint are
    written before it stops the run."""
    return keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs=None: signals.raise_pending(),
        on_epoch_end=lambda epoch, logs=None: signals.raise_pending(),
    )


def fit_run(
    model, opts: TrainOptions, index: CacheIndex, splits: Splits, run_dir: Path, tracking: list | tuple = ()
) -> FitResult:
    """Fit, checkpointing the best epoch into ``run_dir``; Ctrl-C or SIGTERM keeps what was reached.
    ``tracking``: more callbacks (TensorBoard, MLflow: featpipe.runs.tracking), run after history.csv's row."""
    keras = import_keras()

    from featpipe.training.nonfinite import FiniteCheckpoint, StopOnNonFinite, best_epoch  # lazy: imports Keras
    from featpipe.training.streaming import streaming_allocator  # lazy: featpipe.training.streaming imports Keras

    model_path = run_dir / runs.MODEL_FILE
    staged = run_dir / ("staged-" + runs.MODEL_FILE)
    streamed = choose_stream(index, opts.stream)
    nonfinite = StopOnNonFinite()  # a NaN or infinite loss stops the fit after its batch
    callbacks = [
        nonfinite,
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=opts.patience, restore_best_weights=True),
        # a signal landing inside a checkpoint's write leaves a partial file: write aside, then rename into place;
        # an epoch with a NaN or infinite loss is never the best (Keras takes any first epoch as the best)
        FiniteCheckpoint(staged, monitor="val_loss", save_best_only=True),
        keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs=None: install(staged, model_path) if staged.exists() else None
        ),
        keras.callbacks.CSVLogger(run_dir / "history.csv"),  # after the rename: a logged best epoch is in place
        *tracking,
    ]
    with signals.raising():  # loading rows: nothing to save yet
        fit_data = _fit_data(index, opts, splits.train, splits.val, streamed)
    interrupted = None
    history_rows: list[dict] = []
    try:
        with streaming_allocator(streamed) as allocator_callbacks, signals.deferred():
            hist = model.fit(
                epochs=opts.epochs,
                callbacks=[*callbacks, *allocator_callbacks, interrupt_check(keras)],  # the check last
                verbose=0 if opts.quiet else 2,
                **fit_data,
            )
        history_rows = [dict(zip(hist.history, vals)) for vals in zip(*hist.history.values())]
    except KeyboardInterrupt as exc:
        interrupted = exc
        signals.handled()
    finally:
        _close(fit_data)
        staged.unlink(missing_ok=True)  # a write the interrupt cut short
    if not model_path.exists():
        if interrupted is not None:
            raise interrupted  # stopped before the first epoch ended: nothing worth keeping
        if nonfinite.what is not None:
            raise TrainingDiverged(
                f"Training stopped: {nonfinite.what}, before any epoch ended with a finite loss, so no run "
                f"directory was written. Lower the learning rate (--lr, now {opts.lr:g}), or check the cache with "
                f"`featpipe info --verify {index.path}`."
            )
        model.save(model_path)
    model = keras.saving.load_model(model_path)  # the best checkpoint, exactly as predict will load it
    history = _read_history(run_dir / "history.csv") or history_rows
    # never an epoch with a NaN or infinite loss: the one FiniteCheckpoint kept
    return FitResult(model, history, best_epoch(history), streamed, interrupted, diverged=nonfinite.what)


def refit_wanted(opts: TrainOptions, index: CacheIndex, train_rows: np.ndarray) -> bool:
    """``opts.refit``, or when not given: has the smallest train class fewer than REFIT_BELOW clips?"""
    if opts.refit is not None:
        return bool(opts.refit)
    counts = np.bincount(index.labels[train_rows], minlength=len(index.class_names))
    return int(counts[counts > 0].min()) < REFIT_BELOW


def refit_run(opts: TrainOptions, index: CacheIndex, splits: Splits, fit: FitResult, run_dir: Path) -> FitResult:
    """A fresh model of the same configuration trained on train + val for the chosen number of epochs.

    The selected model's val metrics are kept (they are what chose the epoch count); the refit model replaces
    model.keras. Ctrl-C or SIGTERM during the refit keeps the selected model, as if no refit had been asked.
    """
    keras = import_keras()

    from featpipe.runs.metrics import compute_metrics  # lazy: scikit-learn
    from featpipe.training.nonfinite import StopOnNonFinite  # lazy: imports Keras
    from featpipe.training.streaming import streaming_allocator  # lazy: featpipe.training.streaming imports Keras

    probs = predict_rows(fit.model, index, splits.val, opts.batch_size)
    val_metrics = {**compute_metrics(index.labels[splits.val], probs, index.class_names), "split": "val"}
    fit = dataclasses.replace(fit, val_metrics=val_metrics)
    rows = np.sort(np.concatenate([splits.train, splits.val]))
    keras.backend.clear_session()
    model, _ = build_compiled_head(opts, index, rows)
    fit_data = _fit_data(index, opts, rows, None, fit.streamed)
    path = run_dir / ("refit-" + runs.MODEL_FILE)
    nonfinite = StopOnNonFinite()
    try:
        with streaming_allocator(fit.streamed) as allocator_callbacks, signals.deferred():
            model.fit(
                epochs=fit.best_epoch,
                callbacks=[*allocator_callbacks, nonfinite, interrupt_check(keras)],
                verbose=0 if opts.quiet else 2,
                **fit_data,
            )
        if nonfinite.what is not None:  # the selected model stays, as after Ctrl-C during the refit
            what = f"the refit on train + val stopped ({nonfinite.what}); model.keras is the model selected on val"
            return dataclasses.replace(fit, diverged=what)
        model.save(path)
    except KeyboardInterrupt as exc:
        signals.handled()
        path.unlink(missing_ok=True)
        return dataclasses.replace(fit, interrupted=exc)
    finally:
        _close(fit_data)
    install(path, run_dir / runs.MODEL_FILE)
    model = keras.saving.load_model(run_dir / runs.MODEL_FILE)
    return dataclasses.replace(fit, model=model, refit_rows=rows)


def _read_history(path: Path) -> list[dict]:
    if not path.exists() or path.stat().st_size == 0:
        return []
    return pd.read_csv(path).to_dict("records")


def predict_rows(model, index: CacheIndex, rows: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Class probabilities for cache rows, read in chunks so memory stays bounded."""
    out = []
    for start in range(0, len(rows), 512):
        x, _ = load_rows(index, rows[start : start + 512])
        out.append(np.asarray(model.predict(x, batch_size=batch_size, verbose=0)))
    return np.concatenate(out) if out else np.zeros((0, len(index.class_names)))
