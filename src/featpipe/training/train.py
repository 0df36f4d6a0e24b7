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
  report.html              all of it on one self-contained page (featpipe.runs.report), written last

With ``tensorboard`` or ``mlflow`` set, the run is also tracked there (featpipe.runs.tracking): TensorBoard
event files per epoch; an MLflow run with the config, per-epoch and final metrics, and the run directory.

The directory is written to a hidden folder beside its destination and renamed into place when
complete (featpipe.runs.rundir.publish_run); ``models/latest`` is a one-line text file naming the newest
run (works where symlinks don't), updated after the rename.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from featpipe._version import __version__
from featpipe.backbones.registry import file_stem
from featpipe.cache.schema import APPEND_KEYS, PREPROCESSING_KEYS
from featpipe.cache.shards import parse_shard_path
from featpipe.errors import AdvisedOptionError, FeatpipeError, RunWarning, Terminated
from featpipe.names import SPLITS
from featpipe.runs import rundir as runs
from featpipe.runs.tracking import TrainTracking, redact_uri
from featpipe.runtime import signals
from featpipe.runtime.keras_import import import_keras
from featpipe.training.fit import (
    FitResult,
    Splits,
    build_compiled_head,
    fit_run,
    predict_rows,
    refit_run,
    refit_wanted,
)
from featpipe.training.inputs import CacheIndex, cache_fingerprint, check_finite, open_index, resolve_cache
from featpipe.training.options import TrainOptions, resolve_defaults
from featpipe.video.records import stratified_split


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
    report: Path | None = None  # the run's report.html (None: it could not be written, a RunWarning said why)


def _holdout(index: CacheIndex, train_rows: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded STRATIFIED hold-out of ``fraction`` of the train rows (never the last rows)."""
    names = [index.class_names[i] for i in index.labels[train_rows]]
    assigned = np.array(stratified_split([str(v) for v in index.videos[train_rows]], names, fraction, 0.0, seed))
    return train_rows[assigned == "train"], train_rows[assigned == "val"]


def _check_not_a_shard(cache: Path, allow: bool) -> None:
    parsed = parse_shard_path(cache)
    if parsed is None or allow:
        return
    whole, i, n = parsed
    problem = (
        f"names '{cache}', shard {i} of {n} of a sharded extraction (about 1/{n} of the clips); "
        f"combine the shards first with `featpipe merge --output {whole}`, or "
    )
    raise AdvisedOptionError(
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
    runs the same row checks inside its statistics pass (``build_compiled_head``), so that it reads the cache once."""
    check_splits(index)
    check_finite(index, np.arange(len(index.labels)))


def _run_name(index: CacheIndex, head: str) -> str:
    return f"{file_stem(index.config.backbone)}-{head}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


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
            model, head = build_compiled_head(opts, index, splits.train)
            dest = Path(opts.out) if opts.out else _unique(Path(opts.models_dir) / _run_name(index, opts.head))
            fingerprint = cache_fingerprint(index)  # of the cache as trained on
            run_dir = runs.make_temp_dir(dest)  # written here, renamed to dest when complete
            temp_dirs.append(run_dir)
            # TensorBoard and MLflow (--tensorboard, --mlflow): a failure there is a RunWarning, never the run's
            tracking = stack.enter_context(TrainTracking(opts, index, dest.name))
        fit = fit_run(model, opts, index, splits, run_dir, tracking.callbacks())
        # From here a signal is only recorded: one that lands before run.json is written marks the run interrupted
        # (and skips the refit); one that lands later is left pending for the caller (the CLI exits 130/143).
        with signals.recording():
            stopped = fit.interrupted is not None or fit.diverged is not None
            if not stopped and fit.best_epoch and refit_wanted(opts, index, splits.train):
                if signals.pending() is None:
                    fit = refit_run(opts, index, splits, fit, run_dir)
            result = _write_run(opts, index, splits, head, fit, run_dir, dest, fingerprint, started)
            tracking.finish(result)  # final metrics and the published run directory as artifacts
            return result


def _choose_splits(opts: TrainOptions, index: CacheIndex) -> Splits:
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
    return Splits(train_rows, val_rows, splits["test"], val_source)


def _write_run(
    opts: TrainOptions,
    index: CacheIndex,
    splits: Splits,
    head,
    fit: FitResult,
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
            "mlflow": redact_uri(opts.mlflow),  # never a password in run.json
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
    report = _write_report(dest, run_info, fit.model, index, opts)
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
        report=report,
    )


def _write_report(run_dir: Path, info: runs.RunInfo, model, index: CacheIndex, opts: TrainOptions) -> Path | None:
    """report.html into the published run; a failure is a RunWarning, never a lost run."""
    from featpipe.runs.report import REPORT_FILE, WORST, report_from_index

    try:
        return report_from_index(run_dir, info, model, index, index.path, None, WORST, opts.batch_size)
    except Exception as exc:  # noqa: BLE001  the run is complete and kept whatever goes wrong here
        warnings.warn(
            f"warning: {run_dir / REPORT_FILE} was not written ({exc}); the run is complete. "
            f"Write it with `featpipe report {run_dir}`.",
            RunWarning,
            stacklevel=5,
        )
        return None
