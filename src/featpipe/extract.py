"""Stage one: clips -> frozen-backbone features -> HDF5 cache.

decode workers (threads, --workers) -> frames batched ACROSS clips (--batch-size frames per
forward pass) -> backbone -> background writer (crash-safe journal) -> atomic HDF5 finalize.
Padded frames never go through the backbone: their features are zeros and their mask False.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featpipe import __version__
from featpipe.backbones import WEIGHTS_IMAGENET, FeatureExtractor, check_size, default_batch_size, get_backbone
from featpipe.cache import CacheConfig, CacheLock, CacheWriter, ClipRecord, summarize
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
    batch_size: int | None = None  # frames per forward pass; None = sized for the device
    workers: int | None = None  # decode threads; None = from the CPU count
    val_fraction: float = 0.15  # for layouts without given splits
    test_fraction: float = 0.15
    split_seed: int = 1337
    fold: int = 1  # UCF101 split lists
    retry_failed: bool = False  # re-try clips recorded as failed by an earlier run
    strict: bool = False  # any failed clip makes the run fail (after writing the cache)
    quiet: bool = False  # no progress bar


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

    @property
    def frames_per_second(self) -> float:
        return self.new_frames / self.seconds if self.seconds > 0 else 0.0

    @property
    def clips_per_second(self) -> float:
        return self.n_new / self.seconds if self.seconds > 0 else 0.0


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2)))


def cache_path(opts: ExtractOptions) -> Path:
    if opts.output:
        return Path(opts.output)
    return Path(opts.cache_dir) / f"{get_backbone(opts.backbone).name}.h5"


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
    if opts.workers is not None and opts.workers < 1:
        raise FeatpipeError(f"--workers must be at least 1, got {opts.workers}.")


def extract(opts: ExtractOptions | None = None, **kwargs) -> ExtractResult:
    """Extract features for every clip of a dataset into a cache; resume if it exists.

    Returns an ExtractResult. Raises FeatpipeError for user mistakes, ExtractionFailed if no
    clip could be used (or, with ``strict``, if any failed) -- after the cache is written.
    """
    opts = ExtractOptions(**kwargs) if opts is None else dataclasses.replace(opts, **kwargs)
    _validate(opts)
    backbone = get_backbone(opts.backbone)
    size = check_size(backbone, opts.size or backbone.default_size)
    dataset = index_dataset(opts.data, opts.csv, val_fraction=opts.val_fraction,
                            test_fraction=opts.test_fraction, seed=opts.split_seed, fold=opts.fold)
    path = cache_path(opts)
    started = time.perf_counter()
    with CacheLock(path):
        batch_size = opts.batch_size or default_batch_size()
        extractor = FeatureExtractor(backbone, size, opts.weights, opts.seed, batch_size)
        import keras

        config = CacheConfig(
            backbone=backbone.name, weights=extractor.weights, weights_fingerprint=extractor.fingerprint,
            input_size=size, frames=opts.frames, sampling=opts.sampling, dtype=extractor.storage_dtype or opts.dtype,
            feature_shape=extractor.feature_shape, class_names=dataset.class_names,
            extra={"featpipe_version": __version__, "keras_version": keras.__version__,
                   "keras_backend": keras.backend.backend(), "data_root": str(dataset.root),
                   "layout": dataset.layout, "weights_seed": opts.seed},
        )
        writer = CacheWriter(path, config)
        done, failed_before = writer.done, writer.failed
        skip = done | (set() if opts.retry_failed else set(failed_before))
        todo = [r for r in dataset.records if r.video not in skip]
        n_skipped = len(dataset.records) - len(todo)
        new_frames, n_new = 0, 0
        assignments = {r.video: (dataset.label_index(r.label), r.split) for r in dataset.records}
        try:
            if todo:
                new_frames, n_new = _run(todo, dataset, extractor, opts, writer, workers=opts.workers or default_workers())
        except KeyboardInterrupt:
            writer.finalize(assignments)  # Ctrl-C: keep every finished clip in the cache, then stop
            raise
        finally:
            writer.close()
        writer.finalize(assignments)
    seconds = time.perf_counter() - started
    summary = summarize(path)
    result = ExtractResult(path, summary.n_clips, n_new, n_skipped, new_frames, seconds,
                           failed=summary.failed, summary_lines=summary.lines())
    if summary.n_clips == 0:
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


def _run(todo: list[Record], dataset: Dataset, extractor: FeatureExtractor, opts: ExtractOptions,
         writer: CacheWriter, workers: int) -> tuple[int, int]:
    """The pipeline proper. Returns (real frames extracted, clips finished)."""
    from tqdm.auto import tqdm

    batch_size = extractor.batch_size
    dtype = np.dtype(extractor.storage_dtype or opts.dtype)
    out_q: queue.Queue = queue.Queue(maxsize=64)
    writer_error: list[BaseException] = []

    def write_loop():
        while True:
            rec = out_q.get()
            if rec is None:
                return
            try:
                writer.append(rec)
            except BaseException as exc:  # surfaced in the main thread, never swallowed
                writer_error.append(exc)
                return

    def emit(rec: ClipRecord):
        if writer_error:
            raise writer_error[0]
        out_q.put(rec)

    writer_thread = threading.Thread(target=write_loop, name="featpipe-writer", daemon=True)
    writer_thread.start()

    bar = tqdm(total=len(todo), unit="clip", disable=opts.quiet, dynamic_ncols=True, desc=f"extract {extractor.backbone.name}")
    pending_frames: list[np.ndarray] = []  # frames waiting for a batch
    pending_owner: list[tuple[_Slot, int]] = []  # (slot, frame position) per pending frame
    frames_done = 0
    clips_done = 0
    started = time.perf_counter()

    def finish(slot: _Slot):
        nonlocal clips_done
        feats = slot.features.astype(dtype)
        if not np.isfinite(feats[slot.mask]).all():
            raise FeatpipeError(
                f"Features of '{slot.record.video}' are not finite in {opts.dtype} (the backbone's outputs overflow it); "
                f"re-run with --dtype float32 and a new --output file."
            )
        emit(ClipRecord(slot.record.video, slot.label, slot.record.split, slot.n_frames, feats, slot.mask))
        clips_done += 1
        bar.update(1)

    def flush(n: int):
        nonlocal frames_done, pending_frames, pending_owner
        batch = np.stack(pending_frames[:n])
        feats = extractor(batch)
        for (slot, pos), f in zip(pending_owner[:n], feats):
            slot.features[pos] = f
            slot.remaining -= 1
            if slot.remaining == 0:
                finish(slot)
        pending_frames = pending_frames[n:]
        pending_owner = pending_owner[n:]
        frames_done += n
        elapsed = time.perf_counter() - started
        bar.set_postfix_str(f"{frames_done / elapsed:.1f} frames/s", refresh=False)

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
            while inflight:
                rec, fut = inflight.popleft()
                clip = fut.result()
                submit_next()
                label = dataset.label_index(rec.label)
                if isinstance(clip, VideoError):
                    emit(ClipRecord(rec.video, label, rec.split, 0, error=str(clip)))
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
        out_q.put(None)
        writer_thread.join()
        bar.close()
    if writer_error:
        raise writer_error[0]
    return frames_done, clips_done
