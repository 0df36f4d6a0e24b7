"""Stage two: fit a mask-aware sequence model on a feature cache and write a run directory.

A run directory holds everything `featpipe evaluate` and `featpipe predict` need, so nothing is
re-specified by hand:

  model.keras              the trained model (standardisation inside; loads in Keras safe mode)
  run.json                 a featpipe.runs.rundir.RunInfo: training config, class names, the cache's
                           preprocessing attributes copied verbatim, the cache path and fingerprint,
                           the clips trained and validated on, the model's SHA-256, final metrics
  history.csv, curves.png  loss and accuracy per epoch, train and val
  report.json, report.txt  metrics on val and test
  confusion_matrix.png     on test (or val when there is no test split)

The directory is written to a hidden folder beside its destination and renamed into place when
complete (featpipe.runs.rundir.publish_run); ``models/latest`` is a one-line text file naming the newest
run (works where symlinks don't), updated after the rename.
"""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from featpipe._version import __version__
from featpipe.backbones.registry import is_raw
from featpipe.cache.schema import APPEND_KEYS, PREPROCESSING_KEYS
from featpipe.cache.shards import parse_shard_path
from featpipe.errors import FeatpipeError, OptionError, Terminated, TrainingDiverged
from featpipe.names import CLASS_WEIGHTS, HEAD_NAMES, RECURRENT_HEADS, REFIT_BELOW, SPLITS
from featpipe.options import check_choice, check_dir_option, check_float, check_int, split_list_options
from featpipe.runs import rundir as runs
from featpipe.runs.rundir import LATEST, RunError, resolve_run  # noqa: F401  re-exported: featpipe.training.train.resolve_run
from featpipe.runtime import signals
from featpipe.runtime.atomic import install
from featpipe.runtime.keras_import import import_keras
from featpipe.training.inputs import (
    IN_MEMORY_FRACTION,
    CacheIndex,
    cache_fingerprint,
    check_finite,
    choose_stream,
    feature_stats,
    load_rows,
    open_index,
    pca_whitening,
    physical_memory,
    resolve_cache,
)
from featpipe.video.datasets import stratified_split

# upper bounds: far beyond any useful value, low enough to fail with a sentence instead of MemoryError
MAX_EPOCHS = 100_000
MAX_BATCH = 65_536
MAX_UNITS = 16_384
MAX_LAYERS = 64
MAX_HEADS = 256
MAX_L2 = 100.0


@dataclass(frozen=True)
class TrainOptions:
    """Everything `featpipe train` can be told. Defaults are the CLI's defaults."""

    cache: str | Path | None = None  # cache file; None = the single .h5 in cache_dir
    cache_dir: str | Path = "cache"
    head: str = "gru"  # sequence head (featpipe.training.heads.HEADS)
    units: int = 64
    layers: int = 1
    dropout: float = 0.3
    num_heads: int = 4  # transformer only
    epochs: int = 150
    batch_size: int = 32
    lr: float = 3e-3
    patience: int = 20  # epochs without val_loss improvement before stopping
    seed: int = 0
    class_weight: str | None = None  # None or "balanced"
    stream: bool | None = None  # True stream from HDF5, False in memory, None auto
    val_fraction: float = 0.15  # stratified hold-out from train when the cache has no val split
    models_dir: str | Path = "models"
    out: str | Path | None = None  # run directory; default models/<backbone>-<head>-<time>
    quiet: bool = False
    force: bool = False  # replace an existing run directory at `out`
    allow_shard: bool = False  # train on one shard of a sharded extraction (a fraction of the clips)

    # --- regularisation for few clips (issue 10; defaults measured on the hard sample set, see README)
    frames: int | None = None  # steps the head sees; None = the cache's. Fewer: a new jittered subset each epoch
    segments: int = 4  # segments head: temporal segments
    # None = the head's default (HEAD_DEFAULTS; 0 where it has none), resolved by resolve_defaults()
    bottleneck: int | None = None  # learned Dense(bottleneck) + dropout on the standardised features (0 = none)
    pca: int = 0  # PCA-whitening projection fitted on the train frames, saved in the model (0 = none)
    input_dropout: float | None = None  # feature dropout (whole channels of a clip)
    weight_decay: float | None = None  # AdamW decoupled weight decay (0 = Adam)
    label_smoothing: float = 0.0
    pooled_steps: int = 0  # recurrent heads read the means of this many temporal segments (0 = every frame)
    shortcut: int | None = None  # recurrent heads: a frozen logistic regression of this many segment means (0 = none)
    l2: float | None = None  # L2 penalty on the trained classifier's weights (0 = none)
    # after early stopping chose the epoch count on val, train a fresh model on train + val for that many epochs;
    # None = auto: when the smallest class of the train split has fewer than REFIT_BELOW clips
    refit: bool | None = None
    rnn: str | None = None  # the older name of ``head``, still accepted (it wins when given); None after construction

    def __post_init__(self) -> None:
        split_list_options(self)  # no list-valued option yet; a future one takes "a,b" like the CLI
        if self.rnn is not None:  # train(rnn="lstm") keeps working: the older spelling of head
            object.__setattr__(self, "head", self.rnn)
            object.__setattr__(self, "rnn", None)
        check_choice("head", self.head, HEAD_NAMES)
        check_int("units", self.units, 1, MAX_UNITS)
        check_int("layers", self.layers, 1, MAX_LAYERS)
        check_float("dropout", self.dropout, 0.0, 1.0, high_open=True)
        check_int("num_heads", self.num_heads, 1, MAX_HEADS)
        check_int("epochs", self.epochs, 1, MAX_EPOCHS)
        check_int("batch_size", self.batch_size, 1, MAX_BATCH)
        check_float("lr", self.lr, 0.0, 10.0, low_open=True)
        check_int("patience", self.patience, 1, MAX_EPOCHS)
        check_int("seed", self.seed, 0, 2**32 - 1)
        check_choice("class_weight", self.class_weight, CLASS_WEIGHTS, optional=True)
        check_float("val_fraction", self.val_fraction, 0.0, 0.9, low_open=True)
        check_dir_option("cache_dir", self.cache_dir)
        check_dir_option("models_dir", self.models_dir)
        check_dir_option("out", self.out, optional=True)
        check_int("frames", self.frames, 1, 10_000, optional=True)
        check_int("segments", self.segments, 1, 1_000)
        check_int("bottleneck", self.bottleneck, 0, MAX_UNITS, optional=True)
        check_int("pca", self.pca, 0, 100_000)
        check_float("input_dropout", self.input_dropout, 0.0, 1.0, high_open=True, optional=True)
        check_float("weight_decay", self.weight_decay, 0.0, 1.0, optional=True)
        check_float("label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        check_int("pooled_steps", self.pooled_steps, 0, 10_000)
        check_int("shortcut", self.shortcut, 0, 10_000, optional=True)
        check_float("l2", self.l2, 0.0, MAX_L2, optional=True)
        if self.cache is not None and Path(self.cache).is_dir():
            raise OptionError("cache", f"must be a cache file, but '{self.cache}' is a folder.")


# What `train --head gru|lstm|bilstm` uses unless told otherwise: measured on the hard sample set with 16-20
# train clips per class (README, "Defaults for few clips"): alone, the recurrent path overfits (0.81-0.84 test
# accuracy); the segment-mean shortcut, fitted as a logistic regression before training (models.fit_shortcut),
# with the L2 penalty on the recurrent correction, brings gru and lstm within 0.02 of a logistic-regression
# probe on the same segment means, on VGG16 and InceptionV3 features alike.
RECURRENT_DEFAULTS = {"bottleneck": 32, "input_dropout": 0.2, "weight_decay": 0.01, "shortcut": 4, "l2": 0.1}
# every head's defaults for the regularisers above; a head not listed, or a key a head does not list, gets 0
HEAD_DEFAULTS = {**{head: RECURRENT_DEFAULTS for head in RECURRENT_HEADS}, "segments": {"l2": 0.1}}


def resolve_defaults(opts: TrainOptions) -> TrainOptions:
    """``opts`` with every None regulariser replaced by its head's default."""
    defaults = HEAD_DEFAULTS.get(opts.head, {})
    changes = {k: defaults.get(k, type(v)(0)) for k, v in RECURRENT_DEFAULTS.items() if getattr(opts, k) is None}
    if opts.pca and "bottleneck" in changes:
        changes["bottleneck"] = 0  # a PCA projection replaces the learned bottleneck
    return dataclasses.replace(opts, **changes)


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict  # {"val": {...}, "test": {...}} from featpipe.runs.metrics.compute_metrics
    best_epoch: int
    epochs_run: int
    seconds: float
    streamed: bool
    interrupted: bool = False
    history: list[dict] = field(default_factory=list)
    interrupted_by: str | None = None  # "SIGINT" (Ctrl-C) or "SIGTERM" when interrupted
    refit_epochs: int = 0  # the final model was trained on train + val for this many epochs (0 = no refit)
    diverged: str | None = None  # training stopped on a NaN or infinite loss (in words); the run holds the best before


def _holdout(index: CacheIndex, train_rows: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded STRATIFIED hold-out of ``fraction`` of the train rows (never the last rows)."""
    names = [index.class_names[i] for i in index.labels[train_rows]]
    assigned = np.array(stratified_split([str(v) for v in index.videos[train_rows]], names, fraction, 0.0, seed))
    return train_rows[assigned == "train"], train_rows[assigned == "val"]


def _class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)
    return weights


def _check_not_a_shard(cache: Path, allow: bool) -> None:
    parsed = parse_shard_path(cache)
    if parsed is None or allow:
        return
    whole, i, n = parsed
    problem = (
        f"names '{cache}', shard {i} of {n} of a sharded extraction (about 1/{n} of the clips); "
        f"combine the shards first with `featpipe merge --output {whole}`, or "
    )
    raise runs.AdvisedOptionError(
        "cache",
        problem + "pass allow_shard=True to train on this shard alone.",
        problem + "pass --allow-shard to train on this shard alone.",
    )


def check_splits(index: CacheIndex) -> dict[str, np.ndarray]:
    """The rows of each split, refusing a cache with one class, no train split or one class in train."""
    if len(index.class_names) < 2:
        raise FeatpipeError(
            f"'{index.path}' has a single class ({index.class_names[0]}); a classifier needs at least two."
        )
    splits = {s: index.rows(s) for s in SPLITS}
    if not len(splits["train"]):
        present = ", ".join(sorted(set(index.splits))) or "none"
        raise FeatpipeError(
            f"'{index.path}' has no train split (splits present: {present}); re-extract with a train split."
        )
    train_classes = set(index.labels[splits["train"]].tolist())
    if len(train_classes) < 2:
        only = index.class_names[next(iter(train_classes))]
        raise FeatpipeError(
            f"The train split of '{index.path}' holds only the class '{only}'; training needs at least two."
        )
    return splits


def check_cache(index: CacheIndex) -> None:
    """What train refuses before fitting, in one call (``tune`` checks a cache with it before its search):
    the splits (:func:`check_splits`), and every row readable (checksums) and finite. ``train`` itself
    runs the same row checks inside its statistics pass (``_build``), so that it reads the cache once."""
    check_splits(index)
    check_finite(index, np.arange(len(index.labels)))


def compile_model(model, opts: TrainOptions) -> None:
    """The optimiser and loss of ``opts``: Adam, or AdamW with weight decay; label smoothing if asked."""
    keras = import_keras()

    if opts.weight_decay:
        optimizer = keras.optimizers.AdamW(learning_rate=opts.lr, weight_decay=opts.weight_decay)
    else:
        optimizer = keras.optimizers.Adam(learning_rate=opts.lr)
    if opts.label_smoothing:
        from featpipe.training.heads import SparseSmoothedCrossentropy  # lazy: featpipe.training.heads imports Keras

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


def _run_name(index: CacheIndex, head: str) -> str:
    return f"{index.config.backbone}-{head}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _unique(path: Path) -> Path:
    if not path.exists():
        return path
    for i in range(2, 1000):
        candidate = path.with_name(f"{path.name}-{i}")
        if not candidate.exists():
            return candidate
    raise FeatpipeError(f"Too many runs named '{path.name}'; pass --out DIR.")


def train(opts: TrainOptions | None = None, **kwargs) -> TrainResult:
    """Train a head on a cache and write its run directory. Returns a TrainResult.

    Raises FeatpipeError for a missing, damaged or unusable cache (no train split, one class,
    NaN features), a shard file (unless ``allow_shard``), an existing ``out`` (unless ``force``)
    or bad options. Ctrl-C (or SIGTERM, through the CLI's handler) stops training but still writes
    the run directory from the best checkpoint so far (``TrainResult.interrupted``); stopped before
    the first epoch ended, it re-raises and writes nothing. The directory appears whole or not at all.
    """
    opts = TrainOptions(**kwargs) if opts is None else dataclasses.replace(opts, **kwargs)
    opts = resolve_defaults(opts)
    temp_dirs: list[Path] = []
    try:
        return _train(opts, temp_dirs)
    except BaseException as exc:  # an error, Ctrl-C or SIGTERM: no half-written run directory is left
        for path in temp_dirs:
            runs.discard_temp_dir(path)
        if temp_dirs and isinstance(exc, OSError) and exc.errno in runs.WRITE_ERRNOS:
            runs.raise_write_error(exc, temp_dirs[0].parent)  # a full disk while writing the run: one sentence
        raise


@dataclass
class _Splits:
    """The rows a run trains on, validates on and tests on."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    val_source: str  # how the validation rows were chosen, for run.json


@dataclass
class _Fit:
    """What fitting left behind: the best model (as predict will load it) and its history."""

    model: object
    history: list[dict]
    best_epoch: int
    streamed: bool
    interrupted: KeyboardInterrupt | None  # the KeyboardInterrupt (or Terminated) that stopped training
    val_metrics: dict | None = None  # the selected model's val metrics, kept when a refit replaced it
    refit_rows: np.ndarray | None = None  # the rows the final model was refit on (train + val); None = no refit
    diverged: str | None = None  # the loss became NaN or infinite (in words): training stopped there


def _train(opts: TrainOptions, temp_dirs: list[Path]) -> TrainResult:
    """Phases: choose the splits, build the model, fit it into a hidden run folder, write and publish the run."""
    started = time.perf_counter()
    with ExitStack() as stack:
        with signals.raising():  # preparing: nothing to save yet, so a signal stops it where it lands
            cache = resolve_cache(opts.cache, opts.cache_dir)
            _check_not_a_shard(cache, opts.allow_shard)
            if opts.out:
                runs.check_destination(Path(opts.out), opts.force)
            # every read below reads this one file, whatever replaces the cache meanwhile
            index = stack.enter_context(open_index(cache))
            splits = _choose_splits(opts, index)
            model, head = _build(opts, index, splits.train)
            dest = Path(opts.out) if opts.out else _unique(Path(opts.models_dir) / _run_name(index, opts.head))
            fingerprint = cache_fingerprint(index)  # of the cache as trained on
            run_dir = runs.make_temp_dir(dest)  # written here, renamed to dest when complete
            temp_dirs.append(run_dir)
        fit = _fit(model, opts, index, splits, run_dir)
        # From here a signal is only recorded: one that lands before run.json is written marks the run interrupted
        # (and skips the refit); one that lands later is left pending for the caller (the CLI exits 130/143).
        with signals.recording():
            stopped = fit.interrupted is not None or fit.diverged is not None
            if not stopped and fit.best_epoch and refit_wanted(opts, index, splits.train):
                if signals.pending() is None:
                    fit = _refit(opts, index, splits, fit, run_dir)
            return _write_run(opts, index, splits, head, fit, run_dir, dest, fingerprint, started)


def _choose_splits(opts: TrainOptions, index: CacheIndex) -> _Splits:
    splits = check_splits(index)
    train_rows, val_rows = splits["train"], splits["val"]
    val_source = "val split"
    if not len(val_rows):
        train_rows, val_rows = _holdout(index, train_rows, opts.val_fraction, opts.seed)
        val_source = f"stratified {opts.val_fraction:.0%} hold-out of train (seed {opts.seed})"
        if not len(val_rows):
            raise FeatpipeError(
                "The train split is too small to hold out validation clips; add a val split to the cache."
            )
    return _Splits(train_rows, val_rows, splits["test"], val_source)


def head_config(opts: TrainOptions, frames: int):
    """The model's HeadConfig from ``opts`` (regularisers resolved), with ``frames`` steps (0 = the cache's)."""
    from featpipe.training.heads import HeadConfig  # lazy: featpipe.training.heads imports Keras

    fields = (
        "units",
        "layers",
        "dropout",
        "num_heads",
        "segments",
        "bottleneck",
        "pca",
        "input_dropout",
        "pooled_steps",
        "shortcut",
        "l2",
    )
    return HeadConfig(head=opts.head, frames=frames, **{name: getattr(opts, name) for name in fields})


def _build(opts: TrainOptions, index: CacheIndex, train_rows: np.ndarray):
    """The compiled model, with the train split's statistics inside; and its HeadConfig."""
    keras = import_keras()

    from featpipe.training.heads import build_model, fit_shortcut  # lazy: featpipe.training.heads imports Keras

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
    model = build_model(
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


def _fit(model, opts: TrainOptions, index: CacheIndex, splits: _Splits, run_dir: Path) -> _Fit:
    """Fit, checkpointing the best epoch into ``run_dir``; Ctrl-C or SIGTERM keeps what was reached."""
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
    return _Fit(model, history, best_epoch(history), streamed, interrupted, diverged=nonfinite.what)


def refit_wanted(opts: TrainOptions, index: CacheIndex, train_rows: np.ndarray) -> bool:
    """``opts.refit``, or when not given: has the smallest train class fewer than REFIT_BELOW clips?"""
    if opts.refit is not None:
        return bool(opts.refit)
    counts = np.bincount(index.labels[train_rows], minlength=len(index.class_names))
    return int(counts[counts > 0].min()) < REFIT_BELOW


def _refit(opts: TrainOptions, index: CacheIndex, splits: _Splits, fit: _Fit, run_dir: Path) -> _Fit:
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
    model, _ = _build(opts, index, rows)
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


def _write_run(
    opts: TrainOptions,
    index: CacheIndex,
    splits: _Splits,
    head,
    fit: _Fit,
    run_dir: Path,
    dest: Path,
    fingerprint: str,
    started: float,
) -> TrainResult:
    """Reports, plots and run.json into ``run_dir`` (run.json last), then rename it to ``dest``."""
    keras = import_keras()

    from featpipe.runs.metrics import (  # lazy: sklearn
        compute_metrics,
        format_report,
        plot_confusion_matrix,
        plot_curves,
    )

    metrics: dict[str, dict] = {} if fit.val_metrics is None else {"val": fit.val_metrics}
    for split, rows in (("val", splits.val), ("test", splits.test)):
        if len(rows) and split not in metrics:
            probs = predict_rows(fit.model, index, rows, opts.batch_size)
            metrics[split] = {**compute_metrics(index.labels[rows], probs, index.class_names), "split": split}
    report_split = "test" if "test" in metrics else "val"
    (run_dir / "report.json").write_text(json.dumps(metrics, indent=2, allow_nan=False))
    (run_dir / "report.txt").write_text(
        "\n\n".join(f"[{split}]\n{format_report(m)}" for split, m in metrics.items()) + "\n"
    )
    plot_confusion_matrix(metrics[report_split], run_dir / "confusion_matrix.png")
    history = fit.history
    if history:
        plot_curves({k: [h[k] for h in history] for k in history[0]}, run_dir / "curves.png")

    seconds = time.perf_counter() - started
    attrs = index.config.attrs()
    refit = fit.refit_rows is not None
    trained = fit.refit_rows if refit else splits.train  # a refit model has seen the val clips' labels too
    interrupted = fit.interrupted or signals.take()  # a signal since fit returned: the run is interrupted
    run_info = runs.RunInfo(
        run_format=runs.RUN_FORMAT,
        run_id=runs.new_run_id(),
        model_sha256=runs.file_sha256(run_dir / runs.MODEL_FILE),
        featpipe_version=__version__,
        keras_version=keras.__version__,
        keras_backend=keras.backend.backend(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # "rnn" mirrors "head": the older key, which run.json readers and scripts written before --head still read
        config={
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(opts).items()},
            "rnn": opts.head,
        },
        head=head.to_dict(),
        class_names=tuple(index.class_names),
        # everything needed to rebuild stage one exactly (weights_seed: the random network of --weights none)
        preprocessing={**{k: attrs[k] for k in PREPROCESSING_KEYS}, "weights_seed": int(attrs.get("weights_seed", 0))},
        cache_attrs={k: attrs[k] for k in APPEND_KEYS},
        cache=str(index.path.resolve()),
        cache_fingerprint=fingerprint,
        # the clips (cache keys) whose labels the run saw: evaluate refuses a split that overlaps them
        train_clips=tuple(sorted(str(v) for v in index.videos[trained])),
        val_clips=tuple(sorted(str(v) for v in index.videos[splits.val])),
        validation=splits.val_source,
        refit_epochs=fit.best_epoch if refit else 0,
        streamed=fit.streamed,
        epochs_run=len(history),
        best_epoch=fit.best_epoch,
        interrupted=interrupted is not None,
        diverged=fit.diverged,
        seconds=round(seconds, 2),
        metrics={s: {k: m[k] for k in ("accuracy", "macro_f1", "roc_auc", "n")} for s, m in metrics.items()},
    )
    runs.write_run_file(run_dir, run_info)  # last: a folder with run.json is complete
    runs.publish_run(run_dir, dest, opts.force)  # rename into place, then point models/latest at it
    signal_name = None if interrupted is None else ("SIGTERM" if isinstance(interrupted, Terminated) else "SIGINT")
    return TrainResult(
        dest,
        metrics,
        fit.best_epoch,
        len(history),
        seconds,
        fit.streamed,
        interrupted is not None,
        history,
        signal_name,
        refit_epochs=fit.best_epoch if refit else 0,
        diverged=fit.diverged,
    )


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
