"""Stage one: clips -> frozen-backbone features -> HDF5 cache.

decode workers (threads, --workers) -> frames batched ACROSS clips (--batch-size frames per
forward pass) -> backbone -> background writer (crash-safe journal) -> atomic HDF5 finalize.
Padded frames never go through the backbone: their features are zeros and their mask False.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featpipe._quiet import import_keras
from featpipe._version import __version__
from featpipe.backbones import PRECISIONS, WEIGHTS_IMAGENET, FeatureExtractor, check_size, get_backbone
from featpipe.cache import CacheConfig, CacheLock, CacheWriter, ClipRecord, parse_shard, shard_of, shard_path, summarize
from featpipe.datasets import Dataset, Record, index_dataset
from featpipe.errors import ExtractionFailed, FeatpipeError, OptionError
from featpipe.options import check_choice, check_float, check_int
from featpipe.pipeline import BackgroundWriter, Embedded, Stats, decode, embed

DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class ExtractOptions:
    """Everything `featpipe extract` can be told. Defaults are the CLI's defaults."""

    backbone: str = "inceptionv3"  # registry name (featpipe.backbones.REGISTRY)
    data: str | Path | None = "data"  # dataset folder (layout auto-detected)
    csv: str | Path | None = None  # or a CSV with video_name,tag[,split]
    cache_dir: str | Path = "cache"  # the cache is <cache_dir>/<backbone>.h5 ...
    output: str | Path | None = None  # ... unless an explicit file is given
    frames: int = 20  # sequence length T
    sampling: str = "uniform"  # "uniform" over the whole clip, or "first" N frames
    size: int | None = None  # square input size; None = the backbone's native size
    weights: str = WEIGHTS_IMAGENET  # "imagenet", "none" (deterministic random) or a weights file
    seed: int = 0  # seed of the random network for weights="none"
    dtype: str = "float16"  # storage dtype of features
    batch_size: int | None = None  # frames per forward pass; None = sized from the device's free memory
    precision: str = "float32"  # backbone compute: float32, mixed_float16 or mixed_bfloat16 (storage stays `dtype`)
    workers: int | None = None  # decode threads; None = from the CPU count
    val_fraction: float = 0.15  # for layouts without given splits
    test_fraction: float = 0.15
    split_seed: int = 1337
    fold: int = 1  # UCF101 split lists
    retry_failed: bool = False  # re-try clips recorded as failed by an earlier run
    strict: bool = False  # any failed clip makes the run fail (after writing the cache)
    quiet: bool = False  # no progress bar
    # "I/N": only the clips whose key hashes to shard I of N, into <cache stem>.shard-I-of-N.h5
    # beside the cache (own journal and lock); `featpipe merge` combines the N shards
    shard: str | None = None
    # where the backbone runs: "local" (this process) or "ray" (a Ray cluster; needs `pip install "featpipe[ray]"`)
    engine: str = "local"
    # ray: the cluster's address (host:port); None = RAY_ADDRESS, the one `ray start` began here, or a new local Ray
    ray_address: str | None = None
    num_workers: int | None = None  # ray: backbone actors; None = one per GPU (one per node without GPUs)
    gpus_per_worker: float | None = None  # ray: GPUs each actor reserves; None = 1 if the cluster has GPUs, else 0


@dataclass
class ExtractResult:
    """What one extraction did. ``cache`` is the finished HDF5 file."""

    cache: Path
    n_clips: int  # clips in the cache now
    n_new: int  # clips extracted by this run
    n_skipped: int  # clips found already extracted
    new_frames: int  # real frames this run pushed through the backbone
    seconds: float
    failed: list[tuple[str, str]] = field(default_factory=list)  # (clip, reason), all runs
    summary_lines: list[str] = field(default_factory=list)
    batch_size: int = 0  # frames per forward pass that was used
    setup_seconds: float = 0.0  # before the first clip: indexing, building the backbone, opening the cache
    infer_seconds: float = 0.0  # time inside backbone calls (the device busy, from the pipeline's side)
    starved_seconds: float = 0.0  # time the backbone waited for frames after its first batch (0 = never idle)

    @property
    def frames_per_second(self) -> float:
        return self.new_frames / self.seconds if self.seconds > 0 else 0.0

    @property
    def clips_per_second(self) -> float:
        return self.n_new / self.seconds if self.seconds > 0 else 0.0


def default_workers() -> int:
    """Decode threads: one per usable CPU core (OpenCV releases the GIL while decoding), at most 32."""
    from featpipe.devices import cpu_count

    return max(1, min(32, cpu_count()))


def cache_path(opts: ExtractOptions) -> Path:
    """The file this extraction writes: the cache, or with ``shard`` its shard file beside it."""
    path = Path(opts.output) if opts.output else Path(opts.cache_dir) / f"{get_backbone(opts.backbone).name}.h5"
    return shard_path(path, *parse_shard(opts.shard)) if opts.shard else path


def _validate(opts: ExtractOptions) -> None:
    from featpipe.video import SAMPLING

    if opts.frames < 1:
        raise FeatpipeError(f"--frames must be at least 1, got {opts.frames}.")
    if opts.sampling not in SAMPLING:
        raise FeatpipeError(f"--sampling must be one of {', '.join(SAMPLING)}, got '{opts.sampling}'.")
    if opts.dtype not in DTYPES:
        raise FeatpipeError(f"--dtype must be one of {', '.join(DTYPES)}, got '{opts.dtype}'.")
    if opts.batch_size is not None and opts.batch_size < 1:
        raise FeatpipeError(f"--batch-size must be at least 1, got {opts.batch_size}.")
    if opts.precision not in PRECISIONS:
        raise FeatpipeError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{opts.precision}'.")
    if opts.workers is not None and opts.workers < 1:
        raise FeatpipeError(f"--workers must be at least 1, got {opts.workers}.")
    _validate_engine(opts)


ENGINES = ("local", "ray")
MAX_RAY_WORKERS = 10_000
MAX_GPUS_PER_WORKER = 64


def _validate_engine(opts: ExtractOptions) -> None:
    check_choice("engine", opts.engine, ENGINES)
    check_int("num_workers", opts.num_workers, 1, MAX_RAY_WORKERS, optional=True)
    check_float("gpus_per_worker", opts.gpus_per_worker, 0, MAX_GPUS_PER_WORKER, optional=True)
    if opts.ray_address is not None and not str(opts.ray_address).strip():
        raise OptionError("ray_address", "must be a cluster address such as 10.0.0.1:6379, got an empty string.")
    ray_only = [name for name in ("ray_address", "num_workers", "gpus_per_worker") if getattr(opts, name) is not None]
    if opts.engine != "ray" and ray_only:
        raise OptionError(ray_only[0], f"is for --engine ray only (the engine is '{opts.engine}').")


def extract(opts: ExtractOptions | None = None, **kwargs) -> ExtractResult:
    """Extract features for every clip of a dataset into a cache; resume if it exists.

    Returns an ExtractResult. Raises FeatpipeError for user mistakes, ExtractionFailed if no
    clip could be used (or, with ``strict``, if any failed) -- after the cache is written.
    """
    opts = ExtractOptions(**kwargs) if opts is None else dataclasses.replace(opts, **kwargs)
    _validate(opts)
    if opts.engine == "ray":
        from featpipe.ray_engine import import_ray

        import_ray()  # before any work: without the extra, say how to install it
    shard = parse_shard(opts.shard) if opts.shard else None
    backbone = get_backbone(opts.backbone)
    size = check_size(backbone, opts.size or backbone.default_size)
    dataset = index_dataset(opts.data, opts.csv, val_fraction=opts.val_fraction,
                            test_fraction=opts.test_fraction, seed=opts.split_seed, fold=opts.fold)
    path = cache_path(opts)
    started = time.perf_counter()
    with CacheLock(path):
        extractor = FeatureExtractor(backbone, size, opts.weights, opts.seed, opts.batch_size, opts.precision)
        keras = import_keras()

        config = CacheConfig(
            backbone=backbone.name, weights=extractor.weights, weights_fingerprint=extractor.fingerprint,
            input_size=size, frames=opts.frames, sampling=opts.sampling, dtype=extractor.cache_dtype(opts.dtype),
            feature_shape=extractor.feature_shape, class_names=dataset.class_names,
            extra={"featpipe_version": __version__, "keras_version": keras.__version__,
                   "keras_backend": keras.backend.backend(), "data_root": str(dataset.root),
                   "layout": dataset.layout, "weights_seed": opts.seed, "precision": extractor.precision,
                   **({"shard": f"{shard[0]}/{shard[1]}"} if shard else {})},  # class_names: the WHOLE dataset's
        )
        # a shard takes the clips whose key hashes to it: the same split on every machine
        records = [r for r in dataset.records if shard_of(r.video, shard[1]) == shard[0]] if shard else dataset.records
        writer = CacheWriter(path, config)
        done, failed_before = writer.done, writer.failed
        skip = done | (set() if opts.retry_failed else set(failed_before))
        todo = [r for r in records if r.video not in skip]
        n_skipped = len(records) - len(todo)
        stats = Stats()
        assignments = {r.video: (dataset.label_index(r.label), r.split) for r in records}
        if todo:
            extractor.warm_up()  # compile on an accelerator now, as set-up (a no-op on a CPU and for raw)
        setup_seconds = time.perf_counter() - started  # index, model build and compile, cache checks
        try:
            if todo and opts.engine == "ray":
                from featpipe import ray_engine

                stats = ray_engine.run(todo, dataset, extractor, opts, writer, keras.__version__)
            elif todo:
                stats = _run(todo, dataset, extractor, opts, writer, workers=opts.workers or default_workers())
        except KeyboardInterrupt:
            writer.finalize(assignments)  # Ctrl-C: keep every finished clip in the cache, then stop
            raise
        finally:
            writer.close()
        writer.finalize(assignments)
    seconds = time.perf_counter() - started
    summary = summarize(path)
    result = ExtractResult(path, summary.n_clips, stats.clips, n_skipped, stats.frames, seconds,
                           failed=summary.failed, summary_lines=summary.lines(), batch_size=extractor.batch_size,
                           setup_seconds=setup_seconds,
                           infer_seconds=stats.infer_seconds, starved_seconds=stats.starved_seconds)
    if summary.n_clips == 0 and (records or not shard):  # a tiny dataset may leave a shard no clip: not a failure
        raise ExtractionFailed(
            f"No clip could be used ({len(summary.failed)} failed, e.g. {summary.failed[0][0]}: {summary.failed[0][1]}). "
            f"Check that the files are videos OpenCV can decode; the reasons are listed in '{path}' under failed/."
            if summary.failed else f"No clip was extracted into '{path}'."
        )
    if opts.strict and summary.failed:
        raise ExtractionFailed(
            f"{len(summary.failed)} clip(s) failed and --strict was given (first: {summary.failed[0][0]}: "
            f"{summary.failed[0][1]}). The other clips are saved in '{path}'."
        )
    return result


def clip_record(done: Embedded, label: int, dtype: np.dtype) -> ClipRecord:
    """What the writer stores for one finished clip (a failed-clip record when it could not be decoded)."""
    rec: Record = done.item
    if not done.ok:
        return ClipRecord(rec.video, label, rec.split, 0, error=done.error)
    clip = done.windows[0]
    feats = done.features[0].astype(dtype)  # raw frames: exact in float32 and back
    check_finite(rec.video, feats, clip.mask, dtype)
    return ClipRecord(rec.video, label, rec.split, clip.n_frames, feats, clip.mask)


def check_finite(video: str, feats: np.ndarray, mask: np.ndarray, dtype) -> None:
    """A clip's stored features must be finite on its real frames."""
    if not np.isfinite(feats[mask]).all():
        raise FeatpipeError(
            f"Features of '{video}' are not finite in {np.dtype(dtype).name} (the backbone's outputs overflow it); "
            f"re-run with --dtype float32 and a new --output file."
        )


def _run(todo: list[Record], dataset: Dataset, extractor: FeatureExtractor, opts: ExtractOptions,
         writer: CacheWriter, workers: int) -> Stats:
    """The local engine: ``decode`` (``workers`` threads) -> ``embed`` (batches across clips, the
    backbone on its own thread) -> the writer thread (journal). See :mod:`featpipe.pipeline`.

    Ctrl-C or an error: the batch on the device completes, the clips already finished are
    written, the batches still queued are dropped (at most the clips in flight are lost).
    """
    from tqdm.auto import tqdm

    from featpipe.video import read_clip

    dtype = np.dtype(extractor.cache_dtype(opts.dtype))
    stats = Stats()
    clips = decode(todo, lambda rec: read_clip(rec.path, opts.frames, extractor.size, opts.sampling), workers)
    started = time.perf_counter()
    with tqdm(total=len(todo), unit="clip", disable=opts.quiet, dynamic_ncols=True,
              desc=f"extract {extractor.backbone.name}") as bar, BackgroundWriter(writer) as sink:
        for done in embed(clips, extractor, stats):
            sink.put(clip_record(done, dataset.label_index(done.item.label), dtype))
            stats.clips += done.ok
            bar.update(1)
            bar.set_postfix_str(f"{stats.frames / (time.perf_counter() - started):.1f} frames/s", refresh=False)
    return stats
