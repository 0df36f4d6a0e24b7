"""`featpipe sample-data`: write the built-in synthetic dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from featpipe.cli.params import Difficulty, plain

# The defaults are write_sample_data()'s (tests/test_cli_defaults.py holds them equal): importing it here
# would import OpenCV, which --help does not need.


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
    params = plain(locals())
    from featpipe.video.sample_data import write_sample_data  # lazy: OpenCV, which --help does not need

    result = write_sample_data(**params)
    splits = ", ".join(f"{n} {s}" for s, n in result.counts.items())
    typer.echo(
        f"Sample data in {result.root}: {result.n_clips} clips ({splits}), classes {', '.join(result.class_names)}."
    )
