"""`featpipe zero-shot`: rank label names for clips, or score a cache against its class names, with no training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from featpipe.cli.params import (
    BATCH_HELP,
    DECODER_HELP,
    PRECISION_HELP,
    WORKERS_HELP,
    Decoder,
    Precision,
    Sampling,
    defaults,
    plain,
)
from featpipe.cli.runs import exit_if_clips_failed, say_found
from featpipe.errors import OptionError
from featpipe.extraction.options import ExtractOptions
from featpipe.runs.predict import find_clips
from featpipe.runs.zeroshot import (
    TEXT_FAMILIES,
    check_template,
    format_table,
    parse_labels,
    text_backbones,
    to_json_lines,
    zero_shot,
    zero_shot_cache,
)

EXTRACT = defaults(ExtractOptions)  # clips are decoded and embedded with extract's defaults
ZERO_SHOT = {**defaults(zero_shot), **defaults(zero_shot_cache)}  # each default written once, in the library
TEXT_BACKBONE_HELP = (
    f"Clips: a backbone with a text tower: {', '.join(text_backbones())}, or hub:PRESET of a "
    f'{" or ".join(TEXT_FAMILIES.values())} preset (needs pip install "featpipe[hub]").'
)
# options for clips only: a cache records its backbone, weights and sampling
CLIP_ONLY = (
    "backbone",
    "weights",
    "frames",
    "sampling",
    "fps",
    "decoder",
    "size",
    "batch_size",
    "precision",
    "workers",
)


def zero_shot_cmd(
    clips: Annotated[
        Optional[list[Path]],
        typer.Argument(help="Video files, or folders of them (searched as extract searches one).", readable=False),
    ] = None,
    labels: Annotated[
        Optional[str],
        typer.Option(help='Label names separated by commas, e.g. "cat,dog" [with --cache: the cache\'s class names].'),
    ] = None,
    template: Annotated[
        str, typer.Option(help="Prompt each label is embedded as; {} is replaced by the label.")
    ] = ZERO_SHOT["template"],
    cache: Annotated[
        Optional[Path],
        typer.Option(help="Score this cache's clips (a CLIP or SigLIP cache) instead of clips; reports accuracy."),
    ] = None,
    split: Annotated[str, typer.Option(help="With --cache: the split to score.")] = ZERO_SHOT["split"],
    as_json: Annotated[
        bool, typer.Option("--json", help="JSON Lines, one object per clip (with --cache: one object of metrics).")
    ] = False,
    backbone: Annotated[Optional[str], typer.Option(metavar="<name>", help=TEXT_BACKBONE_HELP)] = None,
    weights: Annotated[
        str,
        typer.Option(
            help="imagenet: the preset's pretrained weights (downloaded once), or a local keras-hub preset folder "
            "holding the text tower and tokenizer (none cannot zero-shot)."
        ),
    ] = ZERO_SHOT["weights"],
    frames: Annotated[Optional[int], typer.Option(help=f"Frames per clip [default: {EXTRACT['frames']}].")] = None,
    sampling: Annotated[
        Optional[Sampling], typer.Option(help="uniform: evenly over the whole clip; first: the first N frames.")
    ] = None,
    fps: Annotated[Optional[float], typer.Option(help="Sample by time: the frames on screen every 1/FPS s.")] = None,
    decoder: Annotated[Optional[Decoder], typer.Option(help=DECODER_HELP)] = None,
    size: Annotated[
        Optional[int], typer.Option(help="Square input size in pixels [default: the backbone's native size].")
    ] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=BATCH_HELP)] = None,
    precision: Annotated[Optional[Precision], typer.Option(help=PRECISION_HELP)] = None,
    workers: Annotated[Optional[int], typer.Option(help=WORKERS_HELP)] = None,
):
    """Classify clips from label names alone with a CLIP or SigLIP backbone's text tower (no training).

    CLIP: softmax probabilities over the labels given (they sum to 1). SigLIP: its own sigmoid score per label
    (independent, they do not sum to 1); labels are ranked by it.
    """
    check_template(template)
    parse_labels(labels)
    clip_options = dict(
        backbone=backbone, weights=weights, frames=frames, sampling=sampling, fps=fps, decoder=decoder, size=size,
        batch_size=batch_size, precision=precision, workers=workers,
    )  # fmt: skip
    if cache is not None:
        if clips:
            raise OptionError("cache", "scores a cache's clips; give either clips or --cache, not both.")
        given = [name for name in CLIP_ONLY if clip_options[name] not in (None, ZERO_SHOT.get(name))]
        if given:
            raise OptionError(given[0], "is for clips; a cache's backbone, weights and sampling are recorded in it.")
        result = zero_shot_cache(cache, split=split, labels=labels, template=template)
        if labels is None:  # on stderr: --json keeps stdout to the metrics
            typer.echo(f"Labels: the cache's class names ({', '.join(result.labels)}).", err=True)
        _report_cache(result, as_json)
        return
    if not clips:
        raise OptionError("clips", "are missing: give video files or folders, or --cache FILE.")
    if backbone is None:
        raise OptionError("backbone", "is needed with clips: a CLIP or SigLIP backbone, e.g. --backbone clip-b16.")
    if labels is None:
        raise OptionError("labels", 'is needed to classify clips: give the label names, e.g. --labels "cat,dog".')
    found = find_clips(clips)
    say_found(found)
    options = plain({k: v for k, v in clip_options.items() if v is not None})
    results = zero_shot(found, labels=labels, template=template, **options)
    typer.echo(to_json_lines(results) if as_json else format_table(results))
    if results and any(r.ok for r in results) and results[[r.ok for r in results].index(True)].scoring == "sigmoid":
        typer.echo("Scores are SigLIP's sigmoid per label: independent, they do not sum to 1.", err=True)
    exit_if_clips_failed(results, found)


def _report_cache(result, as_json: bool) -> None:
    from featpipe.runs.metrics import format_report  # lazy: scikit-learn

    if result.metrics is None:  # labels other than the class names: clips and their ranked labels
        typer.echo(to_json_lines(result.predictions) if as_json else format_table(result.predictions))
        return
    if as_json:
        typer.echo(json.dumps(result.metrics, allow_nan=False))
        return
    rule = "softmax over the labels" if result.scoring == "softmax" else "SigLIP's sigmoid per label"
    typer.echo(
        f"zero-shot on the {result.split} split of {result.cache} ({result.metrics['n']} clips; {rule}; "
        f"prompt {result.template!r})"
    )
    typer.echo(format_report(result.metrics))
