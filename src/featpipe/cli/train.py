"""`featpipe train` and `tune`: fit a sequence head on a cache; search heads and settings."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

import featpipe
from featpipe.cli.params import CACHE_HELP, CV, ClassWeight, Head, defaults, one_cache, plain, renamed
from featpipe.errors import RunWarning
from featpipe.names import REFIT_BELOW
from featpipe.runtime import signals
from featpipe.training.train import TrainOptions
from featpipe.training.tune import TuneOptions, format_leaderboard

TRAIN = defaults(TrainOptions)  # each option's default, written once: in TrainOptions
TUNE = defaults(TuneOptions)  # ... and in TuneOptions (SEARCH_HEADS, TRIAL_EPOCHS, ...)
MLFLOW_HELP = (
    'Log the run to MLflow (needs pip install "featpipe[mlflow]"): a tracking URI such as sqlite:///mlflow.db '
    "or http://host:5000; parameters, per-epoch and final metrics, the run directory as artifacts. A tracking "
    "failure is a warning."
)


def train_cmd(
    cache: Annotated[Optional[Path], typer.Argument(help=CACHE_HELP, show_default=False)] = None,
    head: Annotated[
        Head,
        typer.Option(
            help="Sequence head; all are mask-aware. mean is the order-blind control; "
            "cnn-lstm needs a --backbone raw cache."
        ),
    ] = TRAIN["head"],
    rnn: Annotated[Optional[Head], typer.Option("--rnn", hidden=True)] = TRAIN["rnn"],
    cache_option: Annotated[Optional[Path], typer.Option("--cache", help=CACHE_HELP)] = None,
    cache_dir: Annotated[Path, typer.Option(help="Where to look for the cache when --cache is not given.")] = TRAIN[
        "cache_dir"
    ],
    units: Annotated[int, typer.Option(help="Recurrent units / model width.")] = TRAIN["units"],
    layers: Annotated[int, typer.Option(help="Stacked recurrent or transformer layers.")] = TRAIN["layers"],
    dropout: Annotated[float, typer.Option(help="Dropout rate.")] = TRAIN["dropout"],
    num_heads: Annotated[int, typer.Option(help="Attention heads (transformer).")] = TRAIN["num_heads"],
    epochs: Annotated[int, typer.Option(help="Maximum epochs.")] = TRAIN["epochs"],
    batch_size: Annotated[int, typer.Option(help="Clips per batch.")] = TRAIN["batch_size"],
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = TRAIN["lr"],
    patience: Annotated[
        int, typer.Option(help="Stop after this many epochs without a better val_loss; the best epoch is kept.")
    ] = TRAIN["patience"],
    seed: Annotated[int, typer.Option(help="Seed: same seed, same cache, same metrics on CPU.")] = TRAIN["seed"],
    class_weight: Annotated[
        Optional[ClassWeight], typer.Option(help="balanced: weight classes inversely to their frequency.")
    ] = TRAIN["class_weight"],
    stream: Annotated[
        Optional[bool],
        typer.Option(
            "--stream/--in-memory",
            show_default=False,
            help="Stream batches from HDF5, or load the features into memory [default: by cache size].",
        ),
    ] = TRAIN["stream"],
    val_fraction: Annotated[
        float, typer.Option(help="Stratified hold-out from train when the cache has no val split.")
    ] = TRAIN["val_fraction"],
    models_dir: Annotated[Path, typer.Option(help="Parent folder of run directories.")] = TRAIN["models_dir"],
    out: Annotated[
        Optional[Path], typer.Option(help="Run directory [default: <models-dir>/<backbone>-<head>-<time>].")
    ] = TRAIN["out"],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No per-epoch lines.")] = TRAIN["quiet"],
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Replace the run directory --out if it exists (only when the new run is complete)."
        ),
    ] = TRAIN["force"],
    allow_shard: Annotated[
        bool,
        typer.Option("--allow-shard", help="Train on one shard file (<stem>.shard-I-of-N.h5) instead of refusing it."),
    ] = TRAIN["allow_shard"],
    frames: Annotated[
        Optional[int],
        typer.Option(
            help="Frames the head sees [default: the cache's]; fewer than the "
            "cache holds draws a new jittered subset of real frames each "
            "epoch (evaluate/predict use fixed uniform positions)."
        ),
    ] = TRAIN["frames"],
    segments: Annotated[int, typer.Option(help="Temporal segments of the segments head.")] = TRAIN["segments"],
    bottleneck: Annotated[
        Optional[int],
        typer.Option(
            help="Learned Dense bottleneck (with dropout) on the features "
            "before the head; 0 = none [default: 32 for "
            "gru/lstm/bilstm, else 0].",
            show_default=False,
        ),
    ] = TRAIN["bottleneck"],
    pca: Annotated[
        int,
        typer.Option(
            help="Project features on their first N whitened principal axes (fitted on the "
            "train frames, saved in the model); 0 = none."
        ),
    ] = TRAIN["pca"],
    input_dropout: Annotated[
        Optional[float],
        typer.Option(
            help="Feature dropout: share of feature channels dropped "
            "per clip while training [default: 0.2 for "
            "gru/lstm/bilstm, else "
            "0].",
            show_default=False,
        ),
    ] = TRAIN["input_dropout"],
    weight_decay: Annotated[
        Optional[float],
        typer.Option(
            help="AdamW decoupled weight decay; 0 = plain Adam [default: 0.01 for gru/lstm/bilstm, else 0].",
            show_default=False,
        ),
    ] = TRAIN["weight_decay"],
    shortcut: Annotated[
        Optional[int],
        typer.Option(
            help="gru/lstm/bilstm: a frozen logistic regression of the masked "
            "means of this many temporal segments, fitted on the train split "
            "before training; the recurrent branch learns a correction to "
            "it; 0 = none [default: 4].",
            show_default=False,
        ),
    ] = TRAIN["shortcut"],
    l2: Annotated[
        Optional[float],
        typer.Option(
            "--l2",
            help="L2 penalty on the weights of the trained classifier; 0 = none "
            "[default: 0.1 for gru/lstm/bilstm/segments, else 0].",
            show_default=False,
        ),
    ] = TRAIN["l2"],
    pooled_steps: Annotated[
        int,
        typer.Option(
            help="gru/lstm/bilstm: read the means of this many temporal segments "
            "instead of every frame; 0 = every frame."
        ),
    ] = TRAIN["pooled_steps"],
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing of the cross-entropy.")] = TRAIN[
        "label_smoothing"
    ],
    refit: Annotated[
        Optional[bool],
        typer.Option(
            "--refit/--no-refit",
            show_default=False,
            help="After early stopping chose the epoch count on val, train the "
            "final model on train + val for that many epochs [default: when "
            f"the smallest train class has fewer than {REFIT_BELOW} "
            "clips].",
        ),
    ] = TRAIN["refit"],
    tensorboard: Annotated[
        Optional[Path],
        typer.Option(
            help="Write TensorBoard event files (loss and accuracy per epoch) into DIR/<run name>; "
            "view them with `tensorboard --logdir DIR`.",
            metavar="DIR",
        ),
    ] = TRAIN["tensorboard"],
    mlflow: Annotated[Optional[str], typer.Option(help=MLFLOW_HELP, metavar="URI")] = TRAIN["mlflow"],
    mlflow_experiment: Annotated[str, typer.Option(help="MLflow experiment of the run.")] = TRAIN["mlflow_experiment"],
):
    """Train a mask-aware sequence model on a feature cache; writes a self-describing run directory."""
    params = renamed(plain(locals()), "rnn", "head", "--rnn", "--head", "train", note=False)  # --rnn stays
    params["cache"] = one_cache(params["cache"], params.pop("cache_option"))
    from featpipe.runs.metrics import format_report  # lazy: scikit-learn

    # train raises a signal while it prepares, then only records it: from fit on it is acted on at safe points
    # (the run is saved as interrupted), and one arriving after run.json is written is reported below
    with signals.recording():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RunWarning)
            result = featpipe.train(featpipe.TrainOptions(**params))
        _echo_run_warnings(caught)
        split = "test" if "test" in result.metrics else "val"
        if not quiet:
            typer.echo(format_report(result.metrics[split]))
        how = "streamed from HDF5" if result.streamed else "in memory"
        typer.echo(
            f"Run {result.run_dir}: best epoch {result.best_epoch} of {result.epochs_run} ({how}, "
            f"{result.seconds:.1f}s); "
            + (f"refit on train + val for {result.refit_epochs} epochs; " if result.refit_epochs else "")
            + ", ".join(f"{s} accuracy {m['accuracy']:.3f}" for s, m in result.metrics.items())
        )
        if result.report is not None:
            typer.echo(f"Report: {result.report}")
        if result.interrupted:
            typer.secho("interrupted: the run directory was written from the best checkpoint so far.", err=True)
            raise typer.Exit(143 if result.interrupted_by == "SIGTERM" else 130)
        if result.diverged:
            typer.secho(
                f"stopped: {result.diverged}; the run directory was written from epoch {result.best_epoch}, the "
                f"best before it (run.json records why). Lower the learning rate (--lr, now {params['lr']:g}) to "
                "train further.",
                err=True,
            )
            raise typer.Exit(1)
        late = signals.take()  # arrived after run.json: the run is complete, and kept
        if late is not None:
            typer.secho(f"interrupted: the run was already complete; it is kept in {result.run_dir}.", err=True)
            raise typer.Exit(signals.status(late))


def tune_cmd(
    cache: Annotated[Optional[Path], typer.Argument(help=CACHE_HELP, show_default=False)] = None,
    cache_option: Annotated[Optional[Path], typer.Option("--cache", help=CACHE_HELP)] = None,
    cache_dir: Annotated[Path, typer.Option(help="Where to look for the cache when CACHE is not given.")] = TUNE[
        "cache_dir"
    ],
    trials: Annotated[
        Optional[int], typer.Option(help="Finished trials to reach (earlier runs of the same search count).")
    ] = TUNE["trials"],
    time_budget: Annotated[Optional[float], typer.Option(help="Stop starting trials after this many seconds.")] = TUNE[
        "time_budget"
    ],
    jobs: Annotated[int, typer.Option(help="Worker processes sharing the search.")] = TUNE["jobs"],
    heads: Annotated[str, typer.Option(help="Comma-separated heads to search.")] = TUNE["heads"],
    cv: Annotated[
        CV,
        typer.Option(
            help="How a trial is scored: seeds (train -> val, repeated seeds), folds "
            "(stratified k-fold on train+val), auto (folds when val has fewer than 10 "
            "clips per class)."
        ),
    ] = TUNE["cv"],
    folds: Annotated[int, typer.Option(help="Folds of --cv folds.")] = TUNE["folds"],
    seeds: Annotated[int, typer.Option(help="Seeds of --cv seeds.")] = TUNE["seeds"],
    seed: Annotated[int, typer.Option(help="Seed of the sampler and the fits.")] = TUNE["seed"],
    epochs: Annotated[int, typer.Option(help="Maximum epochs of each fit in a trial.")] = TUNE["epochs"],
    patience: Annotated[int, typer.Option(help="Early-stopping patience of each fit in a trial.")] = TUNE["patience"],
    out: Annotated[
        Optional[Path],
        typer.Option(help="Folder for study.db and the leaderboard [default: <models-dir>/tune-<cache stem>]."),
    ] = TUNE["out"],
    models_dir: Annotated[Path, typer.Option(help="Parent folder of the retrained best run.")] = TUNE["models_dir"],
    retrain: Annotated[
        bool,
        typer.Option(
            "--retrain/--no-retrain",
            help="Retrain the best configuration as a run directory after the search (the same command with "
            "--retrain does it later).",
        ),
    ] = TUNE["retrain"],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")] = TUNE["quiet"],
    mlflow: Annotated[
        Optional[str],
        typer.Option(
            help=MLFLOW_HELP + " tune logs a parent run for the search, each finished trial and the retrained "
            "best as child runs.",
            metavar="URI",
        ),
    ] = TUNE["mlflow"],
    mlflow_experiment: Annotated[str, typer.Option(help="MLflow experiment of the runs.")] = TUNE["mlflow_experiment"],
    tensorboard: Annotated[
        Optional[Path],
        typer.Option(
            help="Write TensorBoard event files of each trial's fits into DIR/trial-N/fit-K and of the retrained "
            "best into DIR/<run name>.",
            metavar="DIR",
        ),
    ] = TUNE["tensorboard"],
):
    """Search heads and settings with Optuna (resumable), print a leaderboard, retrain the best as models/latest."""
    params = plain(locals())  # heads "gru,lstm" is split by TuneOptions, for the CLI and the API alike
    params["cache"] = one_cache(params["cache"], params.pop("cache_option"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RunWarning)
        try:
            result = featpipe.tune(featpipe.TuneOptions(**params))
        finally:  # (also when stopped: the report.html warning of the kept search)
            _echo_run_warnings(caught)
    typer.echo(format_leaderboard(result.leaderboard, result.cv))
    typer.echo(f"Leaderboard: {', '.join(str(p) for p in result.files.values())}")
    if result.run_dir is not None:
        acc = "n/a" if result.test_accuracy is None else f"{result.test_accuracy:.3f}"
        typer.echo(f"Best configuration retrained as {result.run_dir} (models/latest); test accuracy {acc}.")
    if result.report is not None:
        typer.echo(f"Report: {result.report}")


def _echo_run_warnings(caught) -> None:
    """report.html not written, tracking failed: one line on stderr each, not a Python warning with its source."""
    for w in caught:
        if issubclass(w.category, RunWarning):
            typer.secho(str(w.message), err=True, fg=typer.colors.YELLOW)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
