"""`featpipe evaluate`, `report` and `predict`: read a trained run directory back."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

import featpipe
from featpipe.cli.params import (
    BATCH_HELP,
    DECODER_HELP,
    PRECISION_HELP,
    WORKERS_HELP,
    Decoder,
    Precision,
    defaults,
    plain,
    renamed,
)
from featpipe.errors import RunWarning
from featpipe.runs.evaluate import evaluate
from featpipe.runs.predict import PredictOptions, check_csv_path, find_clips, format_table, to_json_lines, write_csv
from featpipe.runs.report import write_report
from featpipe.runs.timeline import format_timeline, timeline_json_lines, write_timeline_csv

EVALUATE = defaults(evaluate)  # each option's default, written once: in evaluate() ...
PREDICT = defaults(PredictOptions)  # ... and in PredictOptions
REPORT = defaults(write_report)


def evaluate_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory, or models/latest.")] = EVALUATE["run"],
    split: Annotated[str, typer.Option(help="Split of the cache to evaluate on.")] = EVALUATE["split"],
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
        if metrics.get("video_seconds") is not None:
            known = metrics["video_seconds_clips"]
            of = "" if known == metrics["n"] else f" (known for {known} of {metrics['n']} clips)"
            seconds = metrics["video_seconds"]
            length = f"{seconds:.0f} seconds" if seconds < 120 else f"{seconds / 60:.1f} minutes"
            typer.echo(f"{metrics['n']} clips, {length} of video{of}")
        typer.echo(format_report(metrics))


def report_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory, or models/latest.")] = REPORT["run"],
    split: Annotated[
        Optional[str],
        typer.Option(help="Split the page is about [default: test when the cache has test clips, else val]."),
    ] = None,
    cache: Annotated[
        Optional[Path],
        typer.Option(help="Cache to score [default: the run's own cache]; its preprocessing must match the run's."),
    ] = None,
    worst: Annotated[int, typer.Option(help="Misclassified clips to show, worst first.")] = REPORT["worst"],
):
    """Write (or rebuild) the run's report.html: one self-contained page to open in any browser."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RunWarning)
        path = featpipe.report(run, split=split, cache=cache, worst=worst)
    for w in caught:  # shown on the page too; here as one line on stderr
        if issubclass(w.category, RunWarning):
            typer.secho(str(w.message), err=True, fg=typer.colors.YELLOW)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    typer.echo(f"Report: {path}")


def predict_cmd(
    clips: Annotated[
        # readable=False: a file or folder we may not read is reported as such with the others, not refused alone
        list[Path],
        typer.Argument(help="Video files, or folders of them (searched as extract searches one).", readable=False),
    ],
    model: Annotated[Path, typer.Option(help="Run directory, or models/latest.")] = PREDICT["model"],
    top_k: Annotated[int, typer.Option(help="Labels to show per clip.")] = PREDICT["top_k"],
    as_json: Annotated[bool, typer.Option("--json", help="JSON Lines: one object per clip.")] = False,
    output: Annotated[Optional[Path], typer.Option(help="Also write one CSV row per clip to this file.")] = None,
    windows: Annotated[
        int, typer.Option(help="Average over this many evenly spaced windows of the run's frame count (long videos).")
    ] = PREDICT["windows"],
    gif: Annotated[
        Optional[Path],
        typer.Option(help="Single clip: write its sampled frames captioned with the top label as an animated GIF."),
    ] = PREDICT["gif"],
    workers: Annotated[Optional[int], typer.Option(help=WORKERS_HELP)] = PREDICT["workers"],
    batch_size: Annotated[Optional[int], typer.Option(help=BATCH_HELP)] = PREDICT["batch_size"],
    precision: Annotated[Precision, typer.Option(help=PRECISION_HELP)] = PREDICT["precision"],
    decoder: Annotated[Decoder, typer.Option(help=DECODER_HELP)] = PREDICT["decoder"],
    timeline: Annotated[
        Optional[float],
        typer.Option(
            help="Classify consecutive windows of this many seconds ([0, S), [S, 2S), ...) each on its own, sampled "
            "as the run's clips were: one row per window (--json: one object per window; --output: one CSV row)."
        ),
    ] = PREDICT["timeline"],
    plot: Annotated[
        Optional[Path],
        typer.Option(help="With --timeline, one clip: draw each class's probability over time into this PNG."),
    ] = PREDICT["plot"],
    old_clips: Annotated[Optional[int], typer.Option("--clips", hidden=True)] = None,
):
    """Classify clips with a trained run, reproducing the preprocessing recorded in it."""
    if output is not None:
        check_csv_path(output)  # a folder or an unwritable place: refused before any clip is decoded
    windows = renamed(
        {"old_clips": old_clips, "windows": windows}, "old_clips", "windows", "--clips", "--windows", "predict"
    )["windows"]
    options = dict(
        model=model,
        top_k=top_k,
        windows=windows,
        workers=workers,
        batch_size=batch_size,
        gif=gif,
        precision=precision,
        decoder=decoder,
        timeline=timeline,
        plot=plot,
    )
    PredictOptions(**plain(options))  # a bad option is refused before any folder is searched
    found = find_clips(clips)
    say_found(found)
    results = featpipe.predict(found, **plain(options))
    if timeline is not None:
        typer.echo(timeline_json_lines(results) if as_json else format_timeline(results))
        if output is not None:
            write_timeline_csv(results, output, top_k)
    else:
        typer.echo(to_json_lines(results) if as_json else format_table(results))
        if output is not None:
            write_csv(results, output, top_k)
    if plot is not None and results and results[0].ok:
        typer.echo(f"Timeline plot: {plot}", err=True)
    exit_if_clips_failed(results, found)


def say_found(found) -> None:
    """How many clips each folder given held, on stderr (--json keeps stdout to one object per clip)."""
    for folder, count in found.folders:
        typer.echo(f"Found {count} clip{'' if count == 1 else 's'} in '{folder}'.", err=True)


def exit_if_clips_failed(results, found) -> None:
    """predict's and zero-shot's ending: exit status 1, with one sentence, when a clip or folder could not be used."""
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
