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
per configuration) and ``report.html`` (:mod:`featpipe.training.tune_report`: the trials, the best
configuration, score against the most important settings, on one page); then the best configuration is
retrained with :func:`featpipe.training.train.train` as a normal run directory in ``models_dir``, which
``models/latest`` names.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import multiprocessing
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featpipe.errors import FeatpipeError, OptionError, RunWarning, Terminated, TuneStorageError
from featpipe.options import check_dir_option, check_writable_parent
from featpipe.runs.tracking import redact_uri, tune_parent
from featpipe.runtime import signals
from featpipe.runtime.atomic import atomic_path, write_text
from featpipe.training import workers
from featpipe.training.inputs import load_rows, open_index, resolve_cache
from featpipe.training.search import TuneOptions, describe, plan_fits, score_config, suggest
from featpipe.training.study import (
    complete_trials,
    leaderboard,
    load_study,
    settle,
    storage_errors,
    study_name,
    study_trials,
    waiting_trials,
)
from featpipe.training.train import check_cache, train
from featpipe.training.tune_report import REPORT_FILE, write_tune_report


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
    report: Path | None = None  # out/report.html (None: it could not be written, a RunWarning said why)
    trials: list = field(default_factory=list, repr=False)  # every trial of the study (Optuna FrozenTrials)
    about: dict = field(default_factory=dict, repr=False)  # what report.html's headline names
    options: dict = field(default_factory=dict, repr=False)  # tune's options, as report.html shows them


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
    study = load_study(Path(db), name, opts.seed * 1000 + worker + len(study_trials(db, name)))  # distinct streams

    def objective(trial):
        params = suggest(trial, opts.heads, index.config.frames)
        started = time.perf_counter()
        log_dir = None if opts.tensorboard is None else Path(opts.tensorboard) / f"trial-{trial.number}"
        accs, losses = score_config(params, data, fits, opts, log_dir)
        trial.set_user_attr("params", params)
        trial.set_user_attr("scores", accs)
        trial.set_user_attr("losses", losses)
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 2))
        return float(np.mean(accs)) - 1e-3 * float(np.mean(losses))  # accuracy first; loss breaks ties

    while True:
        # the default configurations (queued) are scored even when --trials is reached without them
        if opts.trials is not None and len(complete_trials(study)) >= opts.trials and not waiting_trials(study):
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
        with storage_errors(Path(out)):
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
    if opts.tensorboard is not None:  # made now: a worker's first fit would fail on it
        try:
            Path(opts.tensorboard).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OptionError(
                "tensorboard",
                f"names the folder '{opts.tensorboard}', which cannot be made ({exc.strerror or exc}); "
                "choose a folder you can write to.",
            ) from None
    with storage_errors(out):
        out.mkdir(parents=True, exist_ok=True)
        lock = workers.FolderLock(out, "study", "`featpipe tune`")
    with lock:
        with storage_errors(out):
            result = _search(opts, cache, index, mode, fits, out)
        # --mlflow: a parent run for the search, the finished trials as children (a failure is a RunWarning)
        parent = tune_parent(opts, cache, result) if opts.mlflow is not None else None
        try:
            if opts.retrain:
                _retrain(opts, cache, result, parent.run_id if parent is not None and parent.active else None)
        except BaseException as exc:
            if parent is not None:
                parent.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        if parent is not None:
            if result.test_accuracy is not None:
                parent.log_metrics({"best_test_accuracy": result.test_accuracy}, what="logging the retrained best")
            parent.log_files(result.files.values())  # leaderboard files, report.html, best.json (not study.db)
            parent.end()
    return result


def _search(opts: TuneOptions, cache: Path, index, mode: str, fits, out: Path) -> TuneResult:
    """The search itself, with ``out``'s lock held."""
    started = time.perf_counter()
    db = out / "study.db"
    name = study_name(index, opts, mode)
    study = load_study(db, name, opts.seed)
    before = len(complete_trials(study))
    failed_before, _ = settle(study, opts.heads, index.config.frames)
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
            done = len(complete_trials(study))
            if not opts.quiet and done != last:
                print(f"  {done} trials finished", flush=True)
                last = done
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated) through featpipe.runtime.signals
        stopped = exc
        signals.handled()
    finally:
        with signals.deferred():  # a second signal waits until every worker is stopped
            _stop_workers(procs)
    settle(study, (), index.config.frames)  # a trial a stopped worker was running: failed
    reported = []
    while not problems.empty():
        reported.append(problems.get())
    failed = [p.exitcode for p in procs if p.exitcode not in (0, None, -15)]
    rows = leaderboard(study)
    files = _write_outputs(rows, out, mode, {"cache": str(cache.resolve()), "study": name})
    result = TuneResult(out, rows, rows[0] if rows else None, None, None, len(rows) - before, False, files, mode)
    c = index.config
    result.trials = study.get_trials(deepcopy=False)
    result.about = {
        "cache": str(cache.resolve()),
        "backbone": f"{c.backbone} (weights: {c.weights}), {c.frames} frames of {c.input_size} px, {c.sampling}",
        "study": name,
        "seconds": time.perf_counter() - started,
    }
    result.options = {**dataclasses.asdict(opts), "mlflow": redact_uri(opts.mlflow), "study": name, "cv_used": mode}
    _write_report(result)  # also when the search was stopped: the page shows the trials kept
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


def _retrain(opts: TuneOptions, cache: Path, result: TuneResult, mlflow_parent: str | None = None) -> None:
    """Retrain the best configuration as a run directory; an interrupt is re-raised (the search is kept).
    ``mlflow_parent``: the search's MLflow run, which the retrained run is logged under as a child."""
    best = dict(result.leaderboard[0]["params"])
    tracking = {"tensorboard": opts.tensorboard}
    if mlflow_parent is not None:
        tracking |= dict(mlflow=opts.mlflow, mlflow_experiment=opts.mlflow_experiment, mlflow_parent=mlflow_parent)
    run = train(cache=cache, models_dir=opts.models_dir, seed=opts.seed, quiet=True, **best, **tracking)
    if run.interrupted:  # train wrote its run from the best checkpoint; rerunning the command retrains
        raise Terminated() if run.interrupted_by == "SIGTERM" else KeyboardInterrupt()
    result.run_dir, result.test_accuracy = run.run_dir, run.metrics.get("test", {}).get("accuracy")
    summary = {"best": result.leaderboard[0], "run_dir": str(run.run_dir), "test_accuracy": result.test_accuracy}
    with storage_errors(result.out):
        _atomic_write(result.out / "best.json", json.dumps(summary, indent=2, default=str))
    result.files["best"] = result.out / "best.json"
    result.about["retrain_seconds"] = run.seconds
    _write_report(result)  # again, now with the retrained run's link and test accuracy


def _write_report(result: TuneResult) -> None:
    """report.html into ``out`` (and into ``result.files``); a failure is a RunWarning, never a lost search."""
    path = result.out / REPORT_FILE
    try:
        result.report = write_tune_report(
            result.out,
            result.trials,
            result.leaderboard,
            result.cv,
            result.about,
            result.options,
            result.run_dir,
            result.test_accuracy,
        )
        result.files["report"] = result.report
    except Exception as exc:  # noqa: BLE001  the search is kept whatever goes wrong here
        result.report = None
        result.files.pop("report", None)
        warnings.warn(
            f"warning: {path} was not written ({exc}); the search is kept in study.db and the leaderboard files.",
            RunWarning,
            stacklevel=2,
        )
