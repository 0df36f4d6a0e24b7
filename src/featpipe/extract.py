"""Stage one: clips -> frozen-backbone features -> HDF5 cache.

decode workers (threads, --workers) -> frames batched ACROSS clips (--batch-size frames per
forward pass) -> backbone -> background writer (crash-safe journal) -> atomic HDF5 finalize.
Padded frames never go through the backbone: their features are zeros and their mask False.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featpipe._quiet import import_keras
from featpipe._version import __version__
from featpipe.backbones import PRECISIONS, WEIGHTS_IMAGENET, FeatureExtractor, check_size, get_backbone
from featpipe.cache import CacheConfig, CacheLock, CacheWriter, ClipRecord, parse_shard, shard_of, shard_path, summarize
from featpipe.datasets import Dataset, Record, index_dataset
from featpipe.errors import ExtractionFailed, FeatpipeError, VideoError

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


def extract(opts: ExtractOptions | None = None, **kwargs) -> ExtractResult:
    """Extract features for every clip of a dataset into a cache; resume if it exists.

    Returns an ExtractResult. Raises FeatpipeError for user mistakes, ExtractionFailed if no
    clip could be used (or, with ``strict``, if any failed) -- after the cache is written.
    """
    opts = ExtractOptions(**kwargs) if opts is None else dataclasses.replace(opts, **kwargs)
    _validate(opts)
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
            input_size=size, frames=opts.frames, sampling=opts.sampling, dtype=extractor.storage_dtype or opts.dtype,
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
        stats = _Stats()
        assignments = {r.video: (dataset.label_index(r.label), r.split) for r in records}
        if todo and getattr(extractor, "jit_compile", None) is True:
            # an accelerator compiles the forward pass (seconds to minutes): do it now, as set-up, so the
            # pipeline starts with a ready device. On a CPU the first real batch traces it instead, since a
            # warm-up batch there costs a whole forward pass.
            extractor(np.zeros((1, size, size, 3), np.uint8))
        setup_seconds = time.perf_counter() - started  # index, model build and compile, cache checks
        try:
            if todo:
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


@dataclass
class _Slot:
    """A decoded clip waiting for its frames' features."""

    record: Record
    label: int
    n_frames: int
    mask: np.ndarray
    features: np.ndarray  # (T, D) float32, filled as batches come back
    remaining: int  # real frames not yet through the backbone


def _decode(record: Record, frames: int, size: int, sampling: str):
    from featpipe.video import read_clip

    try:
        return read_clip(record.path, frames, size, sampling)
    except VideoError as exc:
        return exc


@dataclass
class _Stats:
    """Where the pipeline's time went (filled by ``_run``)."""

    frames: int = 0  # real frames through the backbone
    clips: int = 0  # clips finished (features written)
    infer_seconds: float = 0.0  # time inside backbone calls
    starved_seconds: float = 0.0  # time the backbone thread waited for a batch, after the first one


def _run(todo: list[Record], dataset: Dataset, extractor: FeatureExtractor, opts: ExtractOptions,
         writer: CacheWriter, workers: int) -> _Stats:
    """The pipeline proper: three kinds of threads connected by bounded queues.

    decode pool (``workers`` threads) -> this thread: frames of consecutive clips stacked into
    fixed-size batches -> backbone thread: one device call per batch, features scattered back
    to their clips -> writer thread: finished clips into the journal. The backbone thread
    always has the next batch waiting (queue of 2), so the device never idles while a batch is
    assembled, and the GIL is free while it computes.
    """
    from tqdm.auto import tqdm

    batch_size = extractor.batch_size
    dtype = np.dtype(extractor.storage_dtype or opts.dtype)
    out_q: queue.Queue = queue.Queue(maxsize=64)
    infer_q: queue.Queue = queue.Queue(maxsize=2)
    errors: list[BaseException] = []  # from the backbone or writer thread, re-raised in this one
    stop = threading.Event()
    stats = _Stats()

    def write_loop():
        while True:
            rec = out_q.get()
            if rec is None:
                return
            try:
                writer.append(rec)
            except BaseException as exc:  # surfaced in the main thread, never swallowed
                errors.append(exc)
                stop.set()
                return

    bar = tqdm(total=len(todo), unit="clip", disable=opts.quiet, dynamic_ncols=True, desc=f"extract {extractor.backbone.name}")
    started = time.perf_counter()

    def finish(slot: _Slot):
        feats = slot.features.astype(dtype)
        if not np.isfinite(feats[slot.mask]).all():
            raise FeatpipeError(
                f"Features of '{slot.record.video}' are not finite in {opts.dtype} (the backbone's outputs overflow it); "
                f"re-run with --dtype float32 and a new --output file."
            )
        out_q.put(ClipRecord(slot.record.video, slot.label, slot.record.split, slot.n_frames, feats, slot.mask))
        stats.clips += 1
        bar.update(1)

    def infer_loop():
        first = True
        while True:
            waited = time.perf_counter()
            item = infer_q.get()
            if not first:
                stats.starved_seconds += time.perf_counter() - waited
            first = False
            if item is None or stop.is_set():
                return
            batch, owners = item
            try:
                t0 = time.perf_counter()
                feats = extractor(batch)
                stats.infer_seconds += time.perf_counter() - t0
                for (slot, pos), f in zip(owners, feats):
                    slot.features[pos] = f
                    slot.remaining -= 1
                    if slot.remaining == 0:
                        finish(slot)
            except BaseException as exc:
                errors.append(exc)
                stop.set()
                return
            stats.frames += len(owners)
            bar.set_postfix_str(f"{stats.frames / (time.perf_counter() - started):.1f} frames/s", refresh=False)

    def submit_batch(batch: np.ndarray, owners: list):
        while True:  # a bounded put that notices a dead backbone or writer thread
            if errors:
                raise errors[0]
            try:
                infer_q.put((batch, owners), timeout=0.1)
                return
            except queue.Full:
                continue

    threads = [threading.Thread(target=write_loop, name="featpipe-writer", daemon=True),
               threading.Thread(target=infer_loop, name="featpipe-backbone", daemon=True)]
    for thread in threads:
        thread.start()
    pending_frames: list[np.ndarray] = []  # frames waiting for a batch
    pending_owner: list[tuple[_Slot, int]] = []  # (slot, frame position) per pending frame

    def flush(n: int):
        nonlocal pending_frames, pending_owner
        submit_batch(np.stack(pending_frames[:n]), pending_owner[:n])
        pending_frames = pending_frames[n:]
        pending_owner = pending_owner[n:]

    window = max(2 * workers, 4)
    records = iter(todo)
    inflight: deque[tuple[Record, Future]] = deque()
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="featpipe-decode") as pool:
            def submit_next():
                rec = next(records, None)
                if rec is not None:
                    inflight.append((rec, pool.submit(_decode, rec, opts.frames, extractor.size, opts.sampling)))

            for _ in range(window):
                submit_next()
            try:
                while inflight:
                    rec, fut = inflight.popleft()
                    clip = fut.result()
                    submit_next()
                    label = dataset.label_index(rec.label)
                    if isinstance(clip, VideoError):
                        out_q.put(ClipRecord(rec.video, label, rec.split, 0, error=str(clip)))
                        bar.update(1)
                        continue
                    k = int(clip.mask.sum())
                    slot = _Slot(rec, label, clip.n_frames, clip.mask,
                                 np.zeros((opts.frames, *extractor.feature_shape), np.float32), k)  # raw: exact in float32
                    for pos in range(k):
                        pending_frames.append(clip.frames[pos])
                        pending_owner.append((slot, pos))
                    while len(pending_frames) >= batch_size:
                        flush(batch_size)
                if pending_frames:
                    flush(len(pending_frames))
            finally:
                for _, fut in inflight:
                    fut.cancel()
    except BaseException:
        # Ctrl-C or an error: the batch on the device completes and its clips are written; the
        # batches still queued are dropped (at most the clips in flight are lost).
        stop.set()
        raise
    finally:
        _put_until_taken(infer_q, None, threads[1])
        threads[1].join()
        out_q.put(None)
        threads[0].join()
        bar.close()
    if errors:
        raise errors[0]
    return stats


def _put_until_taken(q: queue.Queue, item, consumer: threading.Thread) -> None:
    """Put ``item`` on a bounded queue unless its consumer thread has already ended."""
    while consumer.is_alive():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue
