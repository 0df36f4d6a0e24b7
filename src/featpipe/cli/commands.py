"""The `featpipe` command line. Each command parses options and calls one library function.

This is the only place where a FeatpipeError becomes a message and an exit status:
  0 success, 1 the run finished but data failed (no usable clip, or --strict with failures),
  2 a user mistake (bad option, missing folder, unknown backbone, mismatched cache ...),
  130 interrupted by Ctrl-C, 143 stopped by SIGTERM (finished work is kept either way).
"""

from __future__ import annotations

import functools
import json
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

import featpipe
from featpipe._version import __version__
from featpipe.backbones.registry import REGISTRY, WEIGHTS_IMAGENET
from featpipe.cache.reader import summarize
from featpipe.cache.shards import find_shards, is_whole_cache, parse_shard_path
from featpipe.errors import FeatpipeError, OptionError, Terminated
from featpipe.names import (
    CLASS_WEIGHTS,
    CV_MODES,
    DIFFICULTIES,
    DTYPES,
    ENGINES,
    HEAD_NAMES,
    PRECISIONS,
    REFIT_BELOW,
    SAMPLING,
)
from featpipe.runs.predict import PredictOptions, check_csv_path, find_clips, format_table, to_json_lines, write_csv
from featpipe.runs.rundir import RunWarning
from featpipe.runtime import signals
from featpipe.runtime.keras_import import set_verbose
from featpipe.training.tune import format_leaderboard

app = typer.Typer(
    name="featpipe",
    help="Video classification in two stages: frozen ImageNet CNN features into an HDF5 cache, then fast sequence "
    "models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

BackboneName = Enum("BackboneName", {name: name for name in REGISTRY}, type=str)


def _choices(name: str, values) -> type[Enum]:
    """A str Enum of the library's own names, so --help and the error message list exactly what the library takes."""
    return Enum(name, {value.replace("-", "_"): value for value in values}, type=str)


def _renamed(params: dict, old: str, new: str, old_flag: str, new_flag: str, command: str, note: bool = True) -> dict:
    """Move a hidden old spelling's value to its new name, with a one-line deprecation note on stderr."""
    value = params.pop(old)
    if value is not None:
        if note:
            typer.secho(f"note: {old_flag} is deprecated for {command}; use {new_flag}", err=True)
        params[new] = value
    return params


def _plain(params: dict) -> dict:
    """A command's parameters as the library takes them: each choice (a str Enum) as its plain string."""
    return {k: v.value if isinstance(v, Enum) else v for k, v in params.items()}


Sampling = _choices("Sampling", SAMPLING)
Precision = _choices("Precision", PRECISIONS)


_BACKBONE_HELP = (
    f"Frozen ImageNet CNN: {', '.join(n for n, b in REGISTRY.items() if not b.raw)}; "
    f"or {', '.join(n for n, b in REGISTRY.items() if b.raw)} (the frames themselves, for cnn-lstm)."
)
_PRECISION_HELP = "Backbone compute precision; mixed_* are for GPUs/TPUs (features are stored as --dtype either way)."
_BATCH_HELP = "Frames per backbone forward pass [default: 32 on CPU; on a GPU, sized from its free memory]."
_WORKERS_HELP = "Decoding threads [default: one per CPU core, at most 32]."


DType = _choices("DType", DTYPES)
Engine = _choices("Engine", ENGINES)


INTERRUPTED = "interrupted: finished clips are saved; run the same command again to resume."


def _handles_errors(fn=None, *, interrupted: str = INTERRUPTED, flags: dict[str, str] | None = None):
    """Turn FeatpipeError into one sentence on stderr and its exit status; Ctrl-C into 130, SIGTERM into 143.

    ``interrupted`` is what the command says when stopped (extract: finished clips are kept; train: ...).
    An OptionError names the flag (``--batch-size``), not the Python parameter; ``flags`` maps a
    parameter whose flag is spelled otherwise (``cache_dir`` -> ``--cache``).
    """
    if fn is None:
        return functools.partial(_handles_errors, interrupted=interrupted, flags=flags)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with signals.raising():  # a signal raises where it lands; around this, main() only records it
                return fn(*args, **kwargs)
        except OptionError as exc:
            typer.secho(f"error: {exc.flag_message(flags)}", err=True, fg=typer.colors.RED)
            raise typer.Exit(exc.exit_code) from None
        except FeatpipeError as exc:
            typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated) through featpipe.runtime.signals
            typer.secho(interrupted, err=True)
            raise typer.Exit(143 if isinstance(exc, Terminated) else 130) from None

    return wrapper


def _version(value: bool):
    if value:
        typer.echo(f"featpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            help="Show TensorFlow's own start-up and C++ log lines (hidden by default; or set FEATPIPE_VERBOSE=1).",
        ),
    ] = False,
):
    """featpipe: extract once, train many times, predict with exactly the same preprocessing."""
    set_verbose(verbose)  # before any command imports Keras


Difficulty = _choices("Difficulty", DIFFICULTIES)


@app.command("sample-data")
@_handles_errors
def sample_data_cmd(
    root: Annotated[Path, typer.Argument(help="Folder to write the dataset into.")] = Path("data"),
    train: Annotated[int, typer.Option(help="Training clips per class.")] = 16,
    val: Annotated[int, typer.Option(help="Validation clips per class.")] = 6,
    test: Annotated[int, typer.Option(help="Test clips per class.")] = 6,
    seed: Annotated[int, typer.Option(help="Seed: the same seed writes the same clips.")] = 0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace sample data written with other settings.")
    ] = False,
    difficulty: Annotated[
        Difficulty,
        typer.Option(
            help="easy: the demo's clean clips; hard: noise, moving target, "
            "textured drifting backgrounds, distractors, 6-150 "
            "frames."
        ),
    ] = Difficulty.easy,
):
    """Write the built-in synthetic dataset: real mp4 clips whose classes differ only in frame ORDER."""
    params = _plain(locals())
    from featpipe.video.sample_data import write_sample_data  # lazy: OpenCV, which --help does not need

    result = write_sample_data(**params)
    splits = ", ".join(f"{n} {s}" for s, n in result.counts.items())
    typer.echo(
        f"Sample data in {result.root}: {result.n_clips} clips ({splits}), classes {', '.join(result.class_names)}."
    )


@app.command("extract")
@_handles_errors
def extract_cmd(
    backbone: Annotated[BackboneName, typer.Option(metavar="<name>", help=_BACKBONE_HELP)] = "inceptionv3",
    data: Annotated[
        Optional[Path],
        typer.Option(
            help="Dataset folder: DIR/{train,val,test}/<class>/, DIR/<class>/, or "
            "UCF101 lists [default: data, unless --csv is "
            "given].",
            show_default=False,
        ),
    ] = None,
    csv: Annotated[
        Optional[Path], typer.Option(help="CSV with columns video_name,tag[,split]; paths relative to the CSV.")
    ] = None,
    cache_dir: Annotated[Path, typer.Option(help="Folder for the cache file <backbone>.h5.")] = Path("cache"),
    cache: Annotated[Optional[Path], typer.Option("--cache", hidden=True)] = None,
    output: Annotated[
        Optional[Path], typer.Option(help="Cache file to write instead of <cache-dir>/<backbone>.h5.")
    ] = None,
    frames: Annotated[
        int, typer.Option(help="Frames per clip (sequence length); shorter clips are zero-padded and masked.")
    ] = 20,
    sampling: Annotated[
        Sampling, typer.Option(help="uniform: evenly over the whole clip; first: the first N frames.")
    ] = Sampling.uniform,
    size: Annotated[
        Optional[int], typer.Option(help="Square input size in pixels [default: the backbone's native size].")
    ] = None,
    weights: Annotated[
        str,
        typer.Option(help="imagenet (downloaded once), none (deterministic random network) or a local weights file."),
    ] = WEIGHTS_IMAGENET,
    seed: Annotated[int, typer.Option(help="Seed of the random network with --weights none.")] = 0,
    dtype: Annotated[DType, typer.Option(help="Storage type of the features.")] = DType.float16,
    precision: Annotated[Precision, typer.Option(help=_PRECISION_HELP)] = Precision.float32,
    batch_size: Annotated[Optional[int], typer.Option(help=_BATCH_HELP)] = None,
    workers: Annotated[Optional[int], typer.Option(help=_WORKERS_HELP)] = None,
    val_fraction: Annotated[
        float, typer.Option(help="Validation share for layouts without splits (stratified).")
    ] = 0.15,
    test_fraction: Annotated[float, typer.Option(help="Test share for layouts without splits (stratified).")] = 0.15,
    split_seed: Annotated[int, typer.Option(help="Seed of the stratified split.")] = 1337,
    fold: Annotated[int, typer.Option(help="UCF101 split lists to use (1, 2 or 3).")] = 1,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Try again the clips an earlier run recorded as failed.")
    ] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit with status 1 if any clip failed.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    shard: Annotated[
        Optional[str],
        typer.Option(
            help="I/N: extract only shard I of N (a fixed share of the clips, by "
            "a hash of each clip's name) into <cache stem>.shard-I-of-N.h5; "
            "combine the N shards with `featpipe merge`."
        ),
    ] = None,
    engine: Annotated[
        Engine,
        typer.Option(
            help="Where the backbone runs: local (this process) or ray (a Ray cluster; "
            'needs pip install "featpipe[ray]").'
        ),
    ] = Engine.local,
    ray_address: Annotated[
        Optional[str],
        typer.Option(
            help="--engine ray: the cluster's address (host:port) [default: "
            "RAY_ADDRESS, the cluster `ray start` began here, or a new "
            "local Ray]."
        ),
    ] = None,
    num_workers: Annotated[
        Optional[int],
        typer.Option(
            help="--engine ray: backbone actors [default: one per GPU of the cluster, one per node without GPUs]."
        ),
    ] = None,
    gpus_per_worker: Annotated[
        Optional[float],
        typer.Option(
            help="--engine ray: GPUs each backbone actor reserves [default: 1 if the cluster has GPUs, else 0]."
        ),
    ] = None,
):
    """Extract per-frame features of every clip into an HDF5 cache (resumes an interrupted run)."""
    params = _renamed(_plain(locals()), "cache", "cache_dir", "--cache", "--cache-dir", "extract")
    result = featpipe.extract(featpipe.ExtractOptions(**params))
    typer.echo(
        f"Extracted {result.n_new} clips ({result.new_frames} frames) in {result.seconds:.1f}s: "
        f"{result.clips_per_second:.2f} clips/s, {result.frames_per_second:.1f} frames/s; "
        f"{result.n_skipped} already in the cache."
    )
    for line in result.summary_lines:
        typer.echo(line)
    if shard:
        whole, _, count = parse_shard_path(result.cache)
        typer.echo(
            f"This is shard {shard} of the cache; when all {count} shards are done, combine them with "
            f"`featpipe merge --output {whole}`."
        )


Head = _choices("Head", HEAD_NAMES)
ClassWeight = _choices("ClassWeight", CLASS_WEIGHTS)


TRAIN_INTERRUPTED = "interrupted: training stopped before its first epoch finished; no run directory was written."
READ_INTERRUPTED = "interrupted: nothing was written."


@app.command("train")
@_handles_errors(interrupted=TRAIN_INTERRUPTED)
def train_cmd(
    head: Annotated[
        Head,
        typer.Option(
            help="Sequence head; all are mask-aware. mean is the order-blind control; "
            "cnn-lstm needs a --backbone raw cache."
        ),
    ] = Head.gru,
    rnn: Annotated[Optional[Head], typer.Option("--rnn", hidden=True)] = None,
    cache: Annotated[Optional[Path], typer.Option(help="Cache file [default: the single .h5 in --cache-dir].")] = None,
    cache_dir: Annotated[Path, typer.Option(help="Where to look for the cache when --cache is not given.")] = Path(
        "cache"
    ),
    units: Annotated[int, typer.Option(help="Recurrent units / model width.")] = 64,
    layers: Annotated[int, typer.Option(help="Stacked recurrent or transformer layers.")] = 1,
    dropout: Annotated[float, typer.Option(help="Dropout rate.")] = 0.3,
    num_heads: Annotated[int, typer.Option(help="Attention heads (transformer).")] = 4,
    epochs: Annotated[int, typer.Option(help="Maximum epochs.")] = 150,
    batch_size: Annotated[int, typer.Option(help="Clips per batch.")] = 32,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 3e-3,
    patience: Annotated[
        int, typer.Option(help="Stop after this many epochs without a better val_loss; the best epoch is kept.")
    ] = 20,
    seed: Annotated[int, typer.Option(help="Seed: same seed, same cache, same metrics on CPU.")] = 0,
    class_weight: Annotated[
        Optional[ClassWeight], typer.Option(help="balanced: weight classes inversely to their frequency.")
    ] = None,
    stream: Annotated[
        Optional[bool],
        typer.Option(
            "--stream/--in-memory",
            show_default=False,
            help="Stream batches from HDF5, or load the features into memory [default: by cache size].",
        ),
    ] = None,
    val_fraction: Annotated[
        float, typer.Option(help="Stratified hold-out from train when the cache has no val split.")
    ] = 0.15,
    models_dir: Annotated[Path, typer.Option(help="Parent folder of run directories.")] = Path("models"),
    out: Annotated[
        Optional[Path], typer.Option(help="Run directory [default: <models-dir>/<backbone>-<head>-<time>].")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No per-epoch lines.")] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Replace the run directory --out if it exists (only when the new run is complete)."
        ),
    ] = False,
    allow_shard: Annotated[
        bool,
        typer.Option("--allow-shard", help="Train on one shard file (<stem>.shard-I-of-N.h5) instead of refusing it."),
    ] = False,
    frames: Annotated[
        Optional[int],
        typer.Option(
            help="Frames the head sees [default: the cache's]; fewer than the "
            "cache holds draws a new jittered subset of real frames each "
            "epoch (evaluate/predict use fixed uniform positions)."
        ),
    ] = None,
    segments: Annotated[int, typer.Option(help="Temporal segments of the segments head.")] = 4,
    bottleneck: Annotated[
        Optional[int],
        typer.Option(
            help="Learned Dense bottleneck (with dropout) on the features "
            "before the head; 0 = none [default: 32 for "
            "gru/lstm/bilstm, else 0].",
            show_default=False,
        ),
    ] = None,
    pca: Annotated[
        int,
        typer.Option(
            help="Project features on their first N whitened principal axes (fitted on the "
            "train frames, saved in the model); 0 = none."
        ),
    ] = 0,
    input_dropout: Annotated[
        Optional[float],
        typer.Option(
            help="Feature dropout: share of feature channels dropped "
            "per clip while training [default: 0.2 for "
            "gru/lstm/bilstm, else "
            "0].",
            show_default=False,
        ),
    ] = None,
    weight_decay: Annotated[
        Optional[float],
        typer.Option(
            help="AdamW decoupled weight decay; 0 = plain Adam [default: 0.01 for gru/lstm/bilstm, else 0].",
            show_default=False,
        ),
    ] = None,
    shortcut: Annotated[
        Optional[int],
        typer.Option(
            help="gru/lstm/bilstm: a frozen logistic regression of the masked "
            "means of this many temporal segments, fitted on the train split "
            "before training; the recurrent branch learns a correction to "
            "it; 0 = none [default: 4].",
            show_default=False,
        ),
    ] = None,
    l2: Annotated[
        Optional[float],
        typer.Option(
            "--l2",
            help="L2 penalty on the weights of the trained classifier; 0 = none "
            "[default: 0.1 for gru/lstm/bilstm/segments, else 0].",
            show_default=False,
        ),
    ] = None,
    pooled_steps: Annotated[
        int,
        typer.Option(
            help="gru/lstm/bilstm: read the means of this many temporal segments "
            "instead of every frame; 0 = every frame."
        ),
    ] = 0,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing of the cross-entropy.")] = 0.0,
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
    ] = None,
):
    """Train a mask-aware sequence model on a feature cache; writes a self-describing run directory."""
    params = _renamed(_plain(locals()), "rnn", "head", "--rnn", "--head", "train", note=False)  # --rnn stays
    from featpipe.runs.metrics import format_report  # lazy: scikit-learn

    # train raises a signal while it prepares, then only records it: from fit on it is acted on at safe points
    # (the run is saved as interrupted), and one arriving after run.json is written is reported below
    with signals.recording():
        result = featpipe.train(featpipe.TrainOptions(**params))
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


CV = _choices("CV", CV_MODES)


@app.command("tune")
@_handles_errors(interrupted="interrupted: finished trials are kept in study.db; run the same command again to resume.")
def tune_cmd(
    cache: Annotated[
        Optional[Path], typer.Argument(help="Cache file [default: the single .h5 in --cache-dir].", show_default=False)
    ] = None,
    cache_dir: Annotated[Path, typer.Option(help="Where to look for the cache when CACHE is not given.")] = Path(
        "cache"
    ),
    trials: Annotated[
        Optional[int], typer.Option(help="Finished trials to reach (earlier runs of the same search count).")
    ] = 20,
    time_budget: Annotated[Optional[float], typer.Option(help="Stop starting trials after this many seconds.")] = None,
    jobs: Annotated[int, typer.Option(help="Worker processes sharing the search.")] = 1,
    heads: Annotated[str, typer.Option(help="Comma-separated heads to search.")] = "gru,lstm,segments",
    cv: Annotated[
        CV,
        typer.Option(
            help="How a trial is scored: seeds (train -> val, repeated seeds), folds "
            "(stratified k-fold on train+val), auto (folds when val has fewer than 10 "
            "clips per class)."
        ),
    ] = CV.auto,
    folds: Annotated[int, typer.Option(help="Folds of --cv folds.")] = 3,
    seeds: Annotated[int, typer.Option(help="Seeds of --cv seeds.")] = 2,
    seed: Annotated[int, typer.Option(help="Seed of the sampler and the fits.")] = 0,
    epochs: Annotated[int, typer.Option(help="Maximum epochs of each fit in a trial.")] = 60,
    patience: Annotated[int, typer.Option(help="Early-stopping patience of each fit in a trial.")] = 10,
    out: Annotated[
        Optional[Path],
        typer.Option(help="Folder for study.db and the leaderboard [default: <models-dir>/tune-<cache stem>]."),
    ] = None,
    models_dir: Annotated[Path, typer.Option(help="Parent folder of the retrained best run.")] = Path("models"),
    retrain: Annotated[
        bool,
        typer.Option(
            "--retrain/--no-retrain",
            help="Retrain the best configuration as a run directory after the search (the same command with "
            "--retrain does it later).",
        ),
    ] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")] = False,
):
    """Search heads and settings with Optuna (resumable), print a leaderboard, retrain the best as models/latest."""
    params = _plain(locals())  # heads "gru,lstm" is split by TuneOptions, for the CLI and the API alike
    result = featpipe.tune(featpipe.TuneOptions(**params))
    typer.echo(format_leaderboard(result.leaderboard, result.cv))
    typer.echo(f"Leaderboard: {', '.join(str(p) for p in result.files.values())}")
    if result.run_dir is not None:
        acc = "n/a" if result.test_accuracy is None else f"{result.test_accuracy:.3f}"
        typer.echo(f"Best configuration retrained as {result.run_dir} (models/latest); test accuracy {acc}.")


@app.command("evaluate")
@_handles_errors(interrupted=READ_INTERRUPTED)
def evaluate_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory, or models/latest.")] = Path("models/latest"),
    split: Annotated[str, typer.Option(help="Split of the cache to evaluate on.")] = "test",
    cache: Annotated[
        Optional[Path],
        typer.Option(
            help="Cache to evaluate on [default: the run's own cache]; its preprocessing must match the run's."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")] = False,
):
    """Accuracy, top-k, per-class precision/recall/F1, macro and weighted F1, ROC AUC and the confusion matrix."""
    from featpipe.runs.metrics import format_report  # lazy: scikit-learn

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RunWarning)
        metrics = featpipe.evaluate(run, split=split, cache=cache)
    for w in caught:  # a changed cache: one line on stderr, not a Python warning with its source line
        if issubclass(w.category, RunWarning):
            typer.secho(str(w.message), err=True, fg=typer.colors.YELLOW)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if as_json:
        typer.echo(json.dumps(metrics, allow_nan=False))
    else:
        typer.echo(f"{metrics['run']} on the {split} split of {metrics['cache']}")
        typer.echo(format_report(metrics))


@app.command("predict")
@_handles_errors(interrupted=READ_INTERRUPTED)
def predict_cmd(
    clips: Annotated[
        # readable=False: a file or folder we may not read is reported as such with the others, not refused alone
        list[Path],
        typer.Argument(help="Video files, or folders of them (searched as extract searches one).", readable=False),
    ],
    model: Annotated[Path, typer.Option(help="Run directory, or models/latest.")] = Path("models/latest"),
    top_k: Annotated[int, typer.Option(help="Labels to show per clip.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="JSON Lines: one object per clip.")] = False,
    output: Annotated[Optional[Path], typer.Option(help="Also write one CSV row per clip to this file.")] = None,
    windows: Annotated[
        int, typer.Option(help="Average over this many evenly spaced windows of the run's frame count (long videos).")
    ] = 1,
    gif: Annotated[
        Optional[Path],
        typer.Option(help="Single clip: write its sampled frames captioned with the top label as an animated GIF."),
    ] = None,
    workers: Annotated[Optional[int], typer.Option(help=_WORKERS_HELP)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=_BATCH_HELP)] = None,
    precision: Annotated[Precision, typer.Option(help=_PRECISION_HELP)] = Precision.float32,
    old_clips: Annotated[Optional[int], typer.Option("--clips", hidden=True)] = None,
):
    """Classify clips with a trained run, reproducing the preprocessing recorded in it."""
    if output is not None:
        check_csv_path(output)  # a folder or an unwritable place: refused before any clip is decoded
    windows = _renamed(
        {"old_clips": old_clips, "windows": windows}, "old_clips", "windows", "--clips", "--windows", "predict"
    )["windows"]
    options = dict(
        model=model, top_k=top_k, windows=windows, workers=workers, batch_size=batch_size, gif=gif, precision=precision
    )
    PredictOptions(**_plain(options))  # a bad option is refused before any folder is searched
    found = find_clips(clips)
    for folder, count in found.folders:  # on stderr: --json keeps stdout to one object per clip
        typer.echo(f"Found {count} clip{'' if count == 1 else 's'} in '{folder}'.", err=True)
    results = featpipe.predict(found, **_plain(options))
    typer.echo(to_json_lines(results) if as_json else format_table(results))
    if output is not None:
        write_csv(results, output, top_k)
    problems = []
    failed = sum(not p.ok for p in results) - len(found.unreadable)
    if failed:
        problems.append(f"{failed} of {len(found.paths)} clips could not be classified.")
    if found.unreadable:
        n = len(found.unreadable)
        problems.append(
            f"{n} folder{'' if n == 1 else 's'} could not be read; {'its' if n == 1 else 'their'} clips "
            "were not indexed."
        )
    if problems:
        typer.secho(" ".join(problems), err=True)
        raise typer.Exit(1)


@app.command("merge")
@_handles_errors
def merge_cmd(
    output: Annotated[
        Path, typer.Option(help="The merged cache to write, e.g. cache/inceptionv3.h5.", show_default=False)
    ],
    shards: Annotated[
        Optional[list[Path]],
        typer.Argument(
            help="Shard files; without them, every <output stem>.shard-I-of-N.h5 beside --output.", show_default=False
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --output if it exists.")] = False,
    compact: Annotated[
        bool,
        typer.Option(
            "--compact",
            help="Write one self-contained file (no <output>.parts/ "
            "folder); with one whole cache as argument, compact that "
            "cache.",
        ),
    ] = False,
):
    """Combine the shards of `extract --shard I/N` into one cache, the same as an unsharded extraction writes."""
    whole = compact and shards is not None and len({p.resolve() for p in shards}) == 1 and is_whole_cache(shards[0])
    path = featpipe.merge(shards, output, force=force, compact=compact)
    count = len({p.resolve() for p in shards}) if shards else len(find_shards(output))  # a file named twice counts once
    typer.echo(f"Compacted {shards[0]} into {path}." if whole else f"Merged {count} shards into {path}.")
    for line in summarize(path).lines():
        typer.echo(line)


@app.command("info")
@_handles_errors
def info_cmd(
    path: Annotated[Path, typer.Argument(help="A cache file (.h5), a run directory, or models/latest.")],
    verify: Annotated[
        bool,
        typer.Option(
            "--verify", help="Cache: read every row back and check its checksum; exit 1 naming the damaged clips."
        ),
    ] = False,
):
    """Describe a cache (settings, clips per split and class, failures) or a run (config, classes, metrics)."""
    for line in featpipe.info(path, verify=verify):
        typer.echo(line)


def main() -> None:
    # batch schedulers and container runtimes stop jobs with SIGTERM: treat it as Ctrl-C (finished work is kept);
    # both are remembered until handled, so one swallowed by a garbage-collector callback still stops training
    signals.install()
    try:
        with signals.recording():  # outside a command's own work a signal is recorded, and reported below
            app()  # always ends in SystemExit (typer's standalone mode)
        code = 0
    except SystemExit as exc:
        code = exc.code
    # a signal that arrived after the command had acted (e.g. after a run was written whole) still exits 130/143
    sys.exit(signals.exit_status(code))


if __name__ == "__main__":
    sys.exit(main())
