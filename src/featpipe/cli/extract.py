"""`featpipe extract`, `merge` and `info`: write a feature cache, combine its shards, describe it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

import featpipe
from featpipe.cache.reader import read_config, summarize
from featpipe.cache.shards import find_shards, parse_shard_path
from featpipe.cli.params import (
    BACKBONE_HELP,
    BATCH_HELP,
    DECODER_HELP,
    PRECISION_HELP,
    WORKERS_HELP,
    Decoder,
    DType,
    Engine,
    Precision,
    Sampling,
    defaults,
    one_cache,
    plain,
    renamed,
)
from featpipe.errors import FeatpipeError
from featpipe.extraction.extract import ExtractOptions

EXTRACT = defaults(ExtractOptions)  # each option's default, written once: in ExtractOptions


def extract_cmd(
    backbone: Annotated[str, typer.Option(metavar="<name>", help=BACKBONE_HELP)] = EXTRACT["backbone"],
    data: Annotated[
        Optional[Path],
        typer.Option(
            help="Dataset folder: DIR/{train,val,test}/<class>/, DIR/<class>/, or "
            "UCF101 lists [default: data, unless --csv is "
            "given].",
            show_default=False,
        ),
    ] = EXTRACT["data"],
    csv: Annotated[
        Optional[Path], typer.Option(help="CSV with columns video_name,tag[,split]; paths relative to the CSV.")
    ] = EXTRACT["csv"],
    cache_dir: Annotated[Path, typer.Option(help="Folder for the cache file <backbone>.h5.")] = EXTRACT["cache_dir"],
    cache: Annotated[Optional[Path], typer.Option("--cache", hidden=True)] = None,
    output: Annotated[
        Optional[Path], typer.Option(help="Cache file to write instead of <cache-dir>/<backbone>.h5.")
    ] = EXTRACT["output"],
    frames: Annotated[
        int,
        typer.Option(
            help="Frames per clip (sequence length); shorter clips are zero-padded and masked. A multiple of "
            "the chunk for a video-native backbone (16 for videoprism-b)."
        ),
    ] = EXTRACT["frames"],
    sampling: Annotated[
        Sampling, typer.Option(help="uniform: evenly over the whole clip; first: the first N frames.")
    ] = EXTRACT["sampling"],
    fps: Annotated[
        Optional[float],
        typer.Option(
            help="Sample by time: the frames on screen at 0, 1/FPS, 2/FPS, ... seconds (up to --frames), "
            "instead of --sampling."
        ),
    ] = EXTRACT["fps"],
    decoder: Annotated[Decoder, typer.Option(help=DECODER_HELP)] = EXTRACT["decoder"],
    size: Annotated[
        Optional[int], typer.Option(help="Square input size in pixels [default: the backbone's native size].")
    ] = EXTRACT["size"],
    weights: Annotated[
        str,
        typer.Option(
            help="imagenet (downloaded once; for keras-hub backbones the preset's pretrained weights), none "
            "(deterministic random network) or a local weights file (keras-hub backbones: a preset folder)."
        ),
    ] = EXTRACT["weights"],
    seed: Annotated[int, typer.Option(help="Seed of the random network with --weights none.")] = EXTRACT["seed"],
    dtype: Annotated[DType, typer.Option(help="Storage type of the features.")] = EXTRACT["dtype"],
    precision: Annotated[Precision, typer.Option(help=PRECISION_HELP)] = EXTRACT["precision"],
    batch_size: Annotated[Optional[int], typer.Option(help=BATCH_HELP)] = EXTRACT["batch_size"],
    workers: Annotated[Optional[int], typer.Option(help=WORKERS_HELP)] = EXTRACT["workers"],
    val_fraction: Annotated[
        float, typer.Option(help="Validation share for layouts without splits (stratified).")
    ] = EXTRACT["val_fraction"],
    test_fraction: Annotated[float, typer.Option(help="Test share for layouts without splits (stratified).")] = EXTRACT[
        "test_fraction"
    ],
    split_seed: Annotated[int, typer.Option(help="Seed of the stratified split.")] = EXTRACT["split_seed"],
    fold: Annotated[int, typer.Option(help="UCF101 split lists to use (1, 2 or 3).")] = EXTRACT["fold"],
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Try again the clips an earlier run recorded as failed.")
    ] = EXTRACT["retry_failed"],
    strict: Annotated[bool, typer.Option("--strict", help="Exit with status 1 if any clip failed.")] = EXTRACT[
        "strict"
    ],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = EXTRACT["quiet"],
    shard: Annotated[
        Optional[str],
        typer.Option(
            help="I/N: extract only shard I of N (a fixed share of the clips, by "
            "a hash of each clip's name) into <cache stem>.shard-I-of-N.h5; "
            "combine the N shards with `featpipe merge`."
        ),
    ] = EXTRACT["shard"],
    engine: Annotated[
        Engine,
        typer.Option(
            help="Where the backbone runs: local (this process) or ray (a Ray cluster; "
            'needs pip install "featpipe[ray]").'
        ),
    ] = EXTRACT["engine"],
    ray_address: Annotated[
        Optional[str],
        typer.Option(
            help="--engine ray: the cluster's address (host:port) [default: "
            "RAY_ADDRESS, the cluster `ray start` began here, or a new "
            "local Ray]."
        ),
    ] = EXTRACT["ray_address"],
    num_workers: Annotated[
        Optional[int],
        typer.Option(
            help="--engine ray: backbone actors [default: one per GPU of the cluster, one per node without GPUs]."
        ),
    ] = EXTRACT["num_workers"],
    gpus_per_worker: Annotated[
        Optional[float],
        typer.Option(
            help="--engine ray: GPUs each backbone actor reserves [default: 1 if the cluster has GPUs, else 0]."
        ),
    ] = EXTRACT["gpus_per_worker"],
):
    """Extract per-frame features of every clip into an HDF5 cache (resumes an interrupted run)."""
    params = renamed(plain(locals()), "cache", "cache_dir", "--cache", "--cache-dir", "extract")
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
    one = shards is not None and len({p.resolve() for p in shards}) == 1
    whole = compact and one and shards[0].is_file() and "shard" not in read_config(shards[0]).extra
    path = featpipe.merge(shards, output, force=force, compact=compact)
    count = len({p.resolve() for p in shards}) if shards else len(find_shards(output))  # a file named twice counts once
    typer.echo(f"Compacted {shards[0]} into {path}." if whole else f"Merged {count} shards into {path}.")
    for line in summarize(path).lines():
        typer.echo(line)


def info_cmd(
    path: Annotated[
        Optional[Path],
        typer.Argument(help="A cache file (.h5), a run directory, or models/latest.", show_default=False),
    ] = None,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify", help="Cache: read every row back and check its checksum; exit 1 naming the damaged clips."
        ),
    ] = False,
    cache: Annotated[Optional[Path], typer.Option("--cache", hidden=True)] = None,
):
    """Describe a cache (settings, clips per split and class, failures) or a run (config, classes, metrics)."""
    path = one_cache(path, cache, "PATH")  # `info --cache FILE`, as train and tune take it
    if path is None:
        raise FeatpipeError("Missing argument PATH: a cache file (.h5), a run directory, or models/latest.")
    for line in featpipe.info(path, verify=verify):
        typer.echo(line)
