"""`featpipe tune`: search heads and a few training settings on one cache, then retrain the best.

The search is Optuna's TPE sampler over a small space (head, learning rate, dropout, weight decay,
feature dropout, width, PCA, segments, frames). Why Optuna: its studies live in an SQLite file, so a
search stopped with Ctrl-C (or SIGTERM, or a crash) keeps every finished trial and resumes by
running the same command again; several worker processes share that one file without a server;
it needs no pruning or callbacks in the trainer; and it is a small, pure-Python, well-maintained
library. (KerasTuner would tie the search to Keras models and keep its state in a folder of
per-trial checkpoints; a home-made grid would be neither resumable nor adaptive.)

Each trial is scored on several fits, so that a small validation split does not pick a winner by
luck: with at least :data:`MIN_VAL_PER_CLASS` val clips per class, ``seeds`` fits on train scored on
val (repeated seeds); otherwise stratified ``folds``-fold cross-validation over train + val, each
fold fitted once. The score is the mean validation accuracy (ties: lower mean val loss); the
leaderboard shows mean +/- std over the fits. The test split is never looked at during the search.

Outputs, in ``out`` (default ``models/tune-<cache stem>``): ``study.db`` (the Optuna study),
``leaderboard.txt``, ``leaderboard.csv``, ``leaderboard.json`` and ``leaderboard.png`` (mean +/- std
per configuration); then the best configuration is retrained with :func:`featpipe.training.train.train` as
a normal run directory in ``models_dir``, which ``models/latest`` names.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import json
import multiprocessing
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featpipe.errors import FeatpipeError, OptionError, Terminated
from featpipe.names import CV_MODES, HEAD_NAMES, IMAGE_HEADS
from featpipe.options import (
    check_choice,
    check_dir_option,
    check_float,
    check_int,
    check_writable_parent,
    split_list_options,
)
from featpipe.runs.rundir import WRITE_ERRNOS
from featpipe.runtime import signals
from featpipe.runtime.atomic import atomic_path, write_text
from featpipe.runtime.keras_import import import_keras
from featpipe.training import workers
from featpipe.training.inputs import cache_fingerprint, load_rows, open_index, pca_from_frames, resolve_cache
from featpipe.training.train import (
    TrainOptions,
    check_cache,
    compile_model,
    head_config,
    interrupt_check,
    resolve_defaults,
    train,
)

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

    def __post_init__(self) -> None:
        split_list_options(self)  # heads="gru,lstm" as --heads gru,lstm
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


@dataclass
class TuneResult:
    out: Path
    leaderboard: list[dict]  # best first: {"number", "params", "mean", "std", "loss", "scores", "seconds"}
    best: dict | None
    run_dir: Path | None  # the retrained best (None without retrain)
    test_accuracy: float | None
    finished_here: int  # trials finished by this call
    interrupted: bool = False
    files: dict = field(default_factory=dict)
    cv: str = ""  # "folds" or "seeds": what the leaderboard's mean +/- std is over


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
    else:  # (PCA whitening is not searched: it cost 0.06-0.18 accuracy in every measurement, see README)
        params["units"] = trial.suggest_categorical("units", [16, 32, 64])
        params["bottleneck"] = trial.suggest_categorical("bottleneck", [0, 32, 64])
        params["shortcut"] = trial.suggest_categorical("shortcut", [0, 4])
    if cache_frames >= 8:
        half = trial.suggest_categorical("half_frames", [False, True])
        params["frames"] = cache_frames // 2 if half else None
    return {k: v for k, v in params.items() if v is not None}


def _defaults_as_trial(head: str, cache_frames: int) -> dict:
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


def score_config(params: dict, data: dict, fits, opts: TuneOptions) -> tuple[list[float], list[float]]:
    """Validation accuracy and loss of ``params`` on each fit (same model, optimiser and early stopping as train())."""
    keras = import_keras()

    from featpipe.training.heads import build_model, fit_shortcut  # lazy: featpipe.training.heads imports Keras

    topts = resolve_defaults(TrainOptions(**params))
    x, m, y, where = data["features"], data["mask"], data["labels"], data["where"]
    accs, losses = [], []
    for train_rows, val_rows, seed in fits:
        tr, va = where[train_rows], where[val_rows]
        mean, var = _frame_stats(x[tr], m[tr])
        projection = None
        if topts.pca:
            std = np.sqrt(np.maximum(var, 1e-12))
            projection = pca_from_frames((x[tr][m[tr]].astype(np.float64) - mean) / std, topts.pca)
        frames = 0 if topts.frames in (None, x.shape[1]) else int(topts.frames)
        head = head_config(topts, frames)
        keras.utils.set_random_seed(seed)
        model = build_model(head, x.shape[2:], data["n_classes"], mean, var, pca=projection, seed=seed)
        fit_shortcut(model, [(x[tr], m[tr])], y[tr])
        compile_model(model, topts)
        stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=opts.patience, restore_best_weights=True)
        with signals.deferred():  # a Ctrl-C is raised after the next batch, not inside TensorFlow
            model.fit(
                {"features": x[tr], "mask": m[tr]},
                y[tr],
                batch_size=topts.batch_size,
                epochs=opts.epochs,
                validation_data=({"features": x[va], "mask": m[va]}, y[va]),
                callbacks=[stop, interrupt_check(keras)],
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


def study_name(index, opts: TuneOptions, mode: str) -> str:
    """The study's name in ``study.db``: the cache's fingerprint and everything that changes a trial's score."""
    n = opts.folds if mode == "folds" else opts.seeds
    return f"{cache_fingerprint(index.path)}-{mode}{n}-seed{opts.seed}-{'+'.join(opts.heads)}"


def _storage_url(db: Path) -> str:
    return f"sqlite:///{db.resolve()}"


def _load_study(db: Path, name: str, seed: int):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(_storage_url(db), engine_kwargs={"connect_args": {"timeout": 60}})
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=6)
    return optuna.create_study(
        study_name=name, storage=storage, sampler=sampler, direction="maximize", load_if_exists=True
    )


def study_trials(db: str | Path, name: str) -> list:
    """Every trial of study ``name`` in ``db`` (empty when there is none yet)."""
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=_storage_url(Path(db))).trials
    except KeyError:
        return []


def _complete(study) -> list:
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def _waiting(study) -> list:
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))


def _settle(study, heads: tuple[str, ...], cache_frames: int) -> tuple[int, int]:
    """Make the study whole again after an interruption; called while no worker runs (the lock is held).

    A trial still RUNNING belongs to a worker that was stopped or killed: it is failed (the leaderboard
    lists finished trials only). Each head's default configuration that is neither finished nor waiting
    (first run, or its trial was failed that way) is queued; workers take queued trials first, and the
    search does not end before the queue is empty. Returns (trials failed, defaults queued).
    """
    import optuna

    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in running:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
    kept = _complete(study) + _waiting(study)
    queued = 0
    for head in heads:
        params = _defaults_as_trial(head, cache_frames)
        if not any(t.system_attrs.get("fixed_params", t.params) == params for t in kept):
            study.enqueue_trial(params, user_attrs={"default": head})
            queued += 1
    return len(running), queued


# --------------------------------------------------------------------------------------------
# Storage errors: sentences
# --------------------------------------------------------------------------------------------


class TuneStorageError(FeatpipeError):
    """study.db or the leaderboard cannot be written or read: a read-only folder or a damaged study (exit 2),
    a full disk and the like (exit 1; the finished trials are kept)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


_FULL = ("database or disk is full", "disk i/o error", "no space left")
_READ_ONLY = ("readonly database", "read-only", "unable to open database file", "permission denied")
_DAMAGED = ("file is not a database", "malformed", "not a database")


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        orig = getattr(exc, "orig", None)  # SQLAlchemy's wrapper of the sqlite3 error
        if isinstance(orig, BaseException):
            yield orig
        exc = exc.__cause__ or exc.__context__


def storage_error(exc: BaseException, out: Path) -> TuneStorageError | None:
    """The sentence for an error of the study's storage (SQLAlchemy, Optuna or the OS), or None for anything else."""
    import sqlite3

    import sqlalchemy.exc
    from optuna.exceptions import StorageInternalError

    db = out / "study.db"
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            reason = e.strerror or str(e)
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return TuneStorageError(
                    f"Cannot write the search's files in '{out}' ({reason}); pass an --out folder you can write to."
                )
            return TuneStorageError(
                f"Writing the search's files in '{out}' failed ({reason}); the finished trials are kept in "
                f"{db.name}. Free some space and run the same command again to resume.",
                1,
            )
        if not isinstance(e, (sqlalchemy.exc.SQLAlchemyError, StorageInternalError, sqlite3.Error)):
            continue
        text = str(e).lower()
        reason = str(getattr(e, "orig", None) or e).splitlines()[0]
        if any(k in text for k in _DAMAGED):
            return TuneStorageError(
                f"The study '{db}' is damaged ({reason}) and cannot be resumed; move it away (or restore a copy) "
                f"and run the same command again to start the search anew."
            )
        if any(k in text for k in _READ_ONLY):
            return TuneStorageError(f"Cannot write the study '{db}' ({reason}); pass an --out folder you can write to.")
        if any(k in text for k in _FULL):
            return TuneStorageError(
                f"Writing the study '{db}' failed ({reason}); the finished trials are kept. Free some space and "
                f"run the same command again to resume.",
                1,
            )
    return None


@contextmanager
def _storage_errors(out: Path):
    try:
        yield
    except (OSError, Exception) as exc:
        if isinstance(exc, FeatpipeError):
            raise
        error = storage_error(exc, out)
        if error is None:
            raise
        raise error from None


# --------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------


def _worker(cache: str, db: str, name: str, opts: TuneOptions, deadline: float | None, worker: int = 0) -> None:
    """One worker process: load train+val into memory once, then run trials until the study has
    ``opts.trials`` finished ones and no queued one, or the deadline passes."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    index = open_index(cache)
    _, fits = plan_fits(index, opts)
    rows = np.unique(np.concatenate([np.concatenate([a, b]) for a, b, _ in fits]))
    x, y = load_rows(index, rows)
    where = np.full(len(index.labels), -1, dtype=np.int64)
    where[rows] = np.arange(len(rows))
    data = {
        "features": x["features"],
        "mask": x["mask"],
        "labels": y,
        "where": where,
        "n_classes": len(index.class_names),
    }
    study = _load_study(Path(db), name, opts.seed * 1000 + worker + len(study_trials(db, name)))  # distinct streams

    def objective(trial):
        params = suggest(trial, opts.heads, index.config.frames)
        started = time.perf_counter()
        accs, losses = score_config(params, data, fits, opts)
        trial.set_user_attr("params", params)
        trial.set_user_attr("scores", accs)
        trial.set_user_attr("losses", losses)
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 2))
        return float(np.mean(accs)) - 1e-3 * float(np.mean(losses))  # accuracy first; loss breaks ties

    while True:
        # the default configurations (queued) are scored even when --trials is reached without them
        if opts.trials is not None and len(_complete(study)) >= opts.trials and not _waiting(study):
            return
        left = None if deadline is None else deadline - time.time()
        if left is not None and left <= 0:
            return
        study.optimize(objective, n_trials=1, timeout=left, catch=(), gc_after_trial=True)


def _worker_main(parent: int, problems, out: str, *args) -> None:
    """A worker's process: dies with ``parent``, holds the workers' lock, and reports a FeatpipeError or a
    storage error to the parent as (exit status, sentence) on ``problems`` instead of a traceback."""
    workers.die_with_parent(parent)
    workers.ignore_sigint()
    workers.hold_worker_lock(Path(out) / "study.workers.lock")
    if os.getppid() != parent:  # the parent died before this worker held the lock: a new run may be going on
        os._exit(1)
    try:
        with _storage_errors(Path(out)):
            _worker(*args)
    except FeatpipeError as exc:
        problems.put((exc.exit_code, str(exc)))


def _stop_workers(procs) -> None:
    """Terminate (SIGTERM) and join every started worker; kill one that does not stop."""
    started = [p for p in procs if p.pid is not None]
    for p in started:
        if p.is_alive():
            p.terminate()
    for p in started:
        p.join(timeout=15)
        if p.is_alive():
            p.kill()
            p.join()


def leaderboard(study) -> list[dict]:
    """Finished trials, best first: mean and std of their validation accuracies."""
    rows = []
    for t in _complete(study):
        scores = t.user_attrs.get("scores", [])
        rows.append(
            {
                "number": t.number,
                "params": t.user_attrs.get("params", dict(t.params)),
                "mean": float(np.mean(scores)) if scores else float("nan"),
                "std": float(np.std(scores)) if scores else float("nan"),
                "loss": float(np.mean(t.user_attrs.get("losses", [float("nan")]))),
                "scores": scores,
                "seconds": t.user_attrs.get("seconds"),
            }
        )
    rows.sort(key=lambda r: (-r["mean"], r["loss"], r["number"]))
    return rows


def describe(params: dict) -> str:
    """A short label of a configuration: the head, then its settings."""
    parts = [params["rnn"]]
    for key in (
        "lr",
        "dropout",
        "weight_decay",
        "input_dropout",
        "l2",
        "units",
        "bottleneck",
        "shortcut",
        "segments",
        "layers",
        "frames",
    ):
        if key in params:
            value = params[key]
            parts.append(f"{key}={value:.2g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


def format_leaderboard(rows: list[dict], mode: str, top: int = 10) -> str:
    lines = [f"{'rank':>4}  {'trial':>5}  {'val acc (' + mode + ')':>18}  configuration"]
    for rank, r in enumerate(rows[:top], 1):
        lines.append(f"{rank:>4}  {r['number']:>5}  {r['mean']:>9.3f} +- {r['std']:.3f}  {describe(r['params'])}")
    if len(rows) > top:
        lines.append(f"... {len(rows) - top} more in leaderboard.csv")
    return "\n".join(lines)


def _write_outputs(rows: list[dict], out: Path, mode: str, extra: dict) -> dict:
    files = {}
    text = format_leaderboard(rows, mode)
    _atomic_write(out / "leaderboard.txt", text + "\n")
    files["txt"] = out / "leaderboard.txt"
    _atomic_write(out / "leaderboard.json", json.dumps({**extra, "cv": mode, "trials": rows}, indent=2, default=str))
    files["json"] = out / "leaderboard.json"
    with atomic_path(out / "leaderboard.csv", tmp=out / "leaderboard.csv.tmp") as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            ["rank", "trial", "mean_val_accuracy", "std", "mean_val_loss", "seconds", "configuration", "params_json"]
        )
        for rank, r in enumerate(rows, 1):
            writer.writerow(
                [
                    rank,
                    r["number"],
                    f"{r['mean']:.4f}",
                    f"{r['std']:.4f}",
                    f"{r['loss']:.4f}",
                    r["seconds"],
                    describe(r["params"]),
                    json.dumps(r["params"]),
                ]
            )
    files["csv"] = out / "leaderboard.csv"
    if rows:
        files["png"] = _plot(rows, out / "leaderboard.png", mode)
    return files


def _atomic_write(path: Path, text: str) -> None:
    write_text(path, text, tmp=path.with_name(path.name + ".tmp"))


def _plot(rows: list[dict], path: Path, mode: str, top: int = 15) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = rows[:top][::-1]
    fig, ax = plt.subplots(figsize=(14, 0.45 * len(shown) + 1.2))
    ax.errorbar([r["mean"] for r in shown], range(len(shown)), xerr=[r["std"] for r in shown], fmt="o", capsize=3)
    ax.set_yticks(range(len(shown)))
    ax.set_yticklabels([f"#{r['number']} {describe(r['params'])}" for r in shown], fontsize=7)
    ax.set_xlabel(f"validation accuracy, mean +/- std over {mode}")
    ax.set_xlim(max(0.0, min(r["mean"] - r["std"] for r in shown) - 0.05), 1.01)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.subplots_adjust(left=0.42)  # the configuration labels are long
    try:
        with atomic_path(path, tmp=path.with_name(path.stem + ".tmp.png")) as tmp:  # the suffix names the format
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path


def tune(opts: TuneOptions | None = None, **kwargs) -> TuneResult:
    """Run (or resume) the search, write the leaderboard, retrain the best as a run directory.

    The cache is checked first, as ``train`` checks it (:func:`featpipe.training.train.check_cache`), and the
    folders are checked writable, so a bad input costs no trial. One command at a time works in ``out``
    (``study.lock``; a second one is refused with a sentence), and it waits for the workers of a killed
    one to stop. Ctrl-C (or SIGTERM) stops the workers; finished trials stay in ``study.db``, the
    trials they were running are failed, the leaderboard is written from the finished ones, and the
    KeyboardInterrupt (:class:`~featpipe.errors.Terminated` for SIGTERM) is re-raised. Running the same
    command again resumes the study, scoring first every default configuration not yet finished.
    """
    opts = TuneOptions(**kwargs) if opts is None else dataclasses.replace(opts, **kwargs)
    check_dir_option("out", opts.out, optional=True)
    check_dir_option("models_dir", opts.models_dir)
    cache = resolve_cache(opts.cache, opts.cache_dir)
    index = open_index(cache)
    if len(index.config.feature_shape) != 1:
        raise FeatpipeError(
            f"'{cache}' holds raw frames; `featpipe tune` searches feature heads: "
            f"use a feature cache (e.g. `featpipe extract --backbone resnet50`)."
        )
    check_cache(index)  # train's own refusals (one class, damaged or non-finite rows), before any trial
    mode, fits = plan_fits(index, opts)
    out = Path(opts.out) if opts.out else Path(opts.models_dir) / f"tune-{cache.stem}"
    check_writable_parent("out", out, "the folder")
    if opts.retrain:  # refused now, not after the search
        check_writable_parent("models_dir", opts.models_dir, "the folder")
    with _storage_errors(out):
        out.mkdir(parents=True, exist_ok=True)
        lock = workers.FolderLock(out, "study", "`featpipe tune`")
    with lock:
        with _storage_errors(out):
            result = _search(opts, cache, index, mode, fits, out)
        if opts.retrain:
            _retrain(opts, cache, result)
    return result


def _search(opts: TuneOptions, cache: Path, index, mode: str, fits, out: Path) -> TuneResult:
    """The search itself, with ``out``'s lock held."""
    db = out / "study.db"
    name = study_name(index, opts, mode)
    study = _load_study(db, name, opts.seed)
    before = len(_complete(study))
    failed_before, _ = _settle(study, opts.heads, index.config.frames)
    if not opts.quiet:
        stale = f"; {failed_before} trials interrupted earlier were failed" if failed_before else ""
        print(
            f"Tuning on {cache} ({mode}: {len(fits)} fits per trial), study {db} ({before} finished trials so far"
            f"{stale})",
            flush=True,
        )

    deadline = None if opts.time_budget is None else time.time() + opts.time_budget
    stopped: KeyboardInterrupt | None = None
    ctx = multiprocessing.get_context("spawn")  # no fork after TensorFlow
    problems = ctx.SimpleQueue()
    procs = [
        ctx.Process(
            target=_worker_main,
            args=(os.getpid(), problems, str(out), str(cache), str(db), name, opts, deadline, k),
            daemon=True,
        )
        for k in range(opts.jobs)
    ]
    try:
        with workers.startup_without_sigint():
            for p in procs:
                p.start()
        last = -1
        while any(p.is_alive() for p in procs) and problems.empty():
            time.sleep(0.5)
            signals.raise_pending()  # an interrupt that landed where it was swallowed
            done = len(_complete(study))
            if not opts.quiet and done != last:
                print(f"  {done} trials finished", flush=True)
                last = done
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated) through featpipe.runtime.signals
        stopped = exc
        signals.handled()
    finally:
        with signals.deferred():  # a second signal waits until every worker is stopped
            _stop_workers(procs)
    _settle(study, (), index.config.frames)  # a trial a stopped worker was running: failed
    reported = []
    while not problems.empty():
        reported.append(problems.get())
    failed = [p.exitcode for p in procs if p.exitcode not in (0, None, -15)]
    rows = leaderboard(study)
    files = _write_outputs(rows, out, mode, {"cache": str(cache.resolve()), "study": name})
    result = TuneResult(out, rows, rows[0] if rows else None, None, None, len(rows) - before, False, files, mode)
    if stopped is not None:
        raise stopped
    if reported:
        code, message = reported[0]
        raise TuneStorageError(message, code)
    if failed and not rows:
        raise FeatpipeError(
            f"Every tune worker failed (exit codes {failed}); run `featpipe train` on the cache to see the error."
        )
    if not rows:
        raise FeatpipeError("No trial finished within the time budget; give a larger --time-budget.")
    return result


def _retrain(opts: TuneOptions, cache: Path, result: TuneResult) -> None:
    """Retrain the best configuration as a run directory; an interrupt is re-raised (the search is kept)."""
    best = dict(result.leaderboard[0]["params"])
    run = train(cache=cache, models_dir=opts.models_dir, seed=opts.seed, quiet=True, **best)
    if run.interrupted:  # train wrote its run from the best checkpoint; rerunning the command retrains
        raise Terminated() if run.interrupted_by == "SIGTERM" else KeyboardInterrupt()
    result.run_dir, result.test_accuracy = run.run_dir, run.metrics.get("test", {}).get("accuracy")
    summary = {"best": result.leaderboard[0], "run_dir": str(run.run_dir), "test_accuracy": result.test_accuracy}
    with _storage_errors(result.out):
        _atomic_write(result.out / "best.json", json.dumps(summary, indent=2, default=str))
    result.files["best"] = result.out / "best.json"
