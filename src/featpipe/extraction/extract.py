"""Stage one: clips -> frozen-backbone features -> HDF5 cache.

decode workers (threads, --workers) -> frames batched ACROSS clips (--batch-size frames per
forward pass) -> backbone -> background writer (crash-safe journal) -> atomic HDF5 finalize.
Padded frames never go through the backbone: their features are zeros and their mask False.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from featpipe._version import __version__
from featpipe.backbones.registry import PRECISIONS, WEIGHTS_IMAGENET, FeatureExtractor, check_size, get_backbone
from featpipe.cache.lock import CacheLock
from featpipe.cache.reader import summarize
from featpipe.cache.schema import CacheConfig, ClipRecord, file_identity
from featpipe.cache.shards import parse_shard, shard_of, shard_path
from featpipe.cache.writer import CacheWriter
from featpipe.errors import CacheError, CannotWrite, ExtractionFailed, FeatpipeError, OptionError
from featpipe.extraction import ray_engine
from featpipe.extraction.stages import Embedded, Stats, decode, embed, writing_with_progress
from featpipe.names import DTYPES, ENGINES, SAMPLING  # noqa: F401  re-exported
from featpipe.options import (
    check_choice,
    check_dir_option,
    check_file_option,
    check_float,
    check_int,
    split_list_options,
)
from featpipe.runtime.devices import cpu_count
from featpipe.runtime.keras_import import import_keras
from featpipe.training import inputs as data
from featpipe.video.datasets import Dataset, Record, index_dataset, repair_splits, unreadable_note

MAX_SIZE = 1024  # largest square input: ImageNet backbones are trained at 224-600 px
MAX_FRAMES = 10_000  # frames per clip (sequence length)
MAX_BATCH = 65_536  # frames per forward pass (a memory check below also applies)
MAX_WORKERS = 256
MEMORY_SHARE = 0.8  # of physical memory the clips in flight and the batches may take


@dataclass(frozen=True)
class ExtractOptions:
    """Everything `featpipe extract` can be told. Defaults are the CLI's defaults.

    Every value is checked here, once, for the CLI and the Python API alike: a bad one raises
    ``OptionError`` naming the parameter (the CLI shows it as its flag) before any work starts.
    """

    backbone: str = "inceptionv3"  # registry name (featpipe.backbones.registry.REGISTRY)
    data: str | Path | None = None  # dataset folder (layout auto-detected); None = "data" unless csv is given
    csv: str | Path | None = None  # or a CSV with video_name,tag[,split] (not together with data)
    cache_dir: str | Path = "cache"  # the cache is <cache_dir>/<backbone>.h5 ...
    output: str | Path | None = None  # ... unless an explicit file is given
    frames: int = 20  # sequence length T (1..MAX_FRAMES)
    sampling: str = "uniform"  # "uniform" over the whole clip, or "first" N frames
    size: int | None = None  # square input size (backbone minimum..MAX_SIZE); None = the backbone's native size
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
    retry_failed: bool = False  # re-try clips recorded as failed by an earlier run (a changed file is always retried)
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

    def __post_init__(self):
        split_list_options(self)
        self.validate()

    @property
    def data_folder(self) -> str | Path | None:
        """The dataset folder to index: ``data``, or "data" when neither it nor ``csv`` is given."""
        return self.data if self.data is not None or self.csv is not None else "data"

    def validate(self) -> None:
        """Raise OptionError (naming the parameter) for any value out of range or of the wrong kind."""
        if self.data is not None and self.csv is not None:
            raise OptionError(
                "csv",
                "cannot be combined with a data folder; give either a dataset folder or a "
                "CSV file (its paths are relative to the CSV's own folder), not both.",
            )
        if not isinstance(self.backbone, str):
            raise OptionError("backbone", f"must be a backbone name, got {self.backbone!r}.")
        backbone = get_backbone(self.backbone)
        if self.output is None:  # the cache goes into cache_dir (with output given, cache_dir is not used)
            check_dir_option("cache_dir", self.cache_dir)
        check_file_option("output", self.output, optional=True)
        check_int("frames", self.frames, 1, MAX_FRAMES)
        check_choice("sampling", self.sampling, SAMPLING)
        check_int(
            "size",
            self.size,
            backbone.min_size,
            MAX_SIZE,
            optional=True,
            hint=f"({backbone.name} needs at least {backbone.min_size} pixels; its native size is "
            f"{backbone.default_size}; leave it unset for the native size.)",
        )
        check_int("seed", self.seed, 0)
        check_choice("dtype", self.dtype, DTYPES)
        check_int("batch_size", self.batch_size, 1, MAX_BATCH, optional=True)
        check_choice("precision", self.precision, PRECISIONS)
        check_int("workers", self.workers, 1, MAX_WORKERS, optional=True)
        check_float("val_fraction", self.val_fraction, 0, 1, high_open=True)
        check_float("test_fraction", self.test_fraction, 0, 1, high_open=True)
        if self.val_fraction + self.test_fraction >= 1:
            raise OptionError(
                "val_fraction",
                f"plus test_fraction must be below 1 so some clips are left to train on, "
                f"got {self.val_fraction!r} + {self.test_fraction!r}.",
            )
        check_int("split_seed", self.split_seed, 0)
        check_int("fold", self.fold, 1, 3)
        if self.shard is not None:
            try:
                parse_shard(self.shard)
            except FeatpipeError:
                raise OptionError(
                    "shard", f"must look like I/N with 1 <= I <= N, e.g. 2/4; got {self.shard!r}."
                ) from None
        _validate_engine(self)
        self._check_memory(self.size or backbone.default_size)

    def _check_memory(self, size: int) -> None:
        """The decoded clips in flight and the frame batches must fit in memory: say what fits if not."""
        memory = MEMORY_SHARE * data.physical_memory()
        frame = size * size * 3  # one decoded uint8 frame
        window = max(2 * (self.workers or default_workers()), 4) + 1  # clips decoded ahead, and the one being batched
        batch = self.batch_size or 32
        clips_bytes = window * self.frames * frame
        batch_bytes = 4 * batch * frame * 4  # pending + queued + on the device, as float32 after preprocessing
        if clips_bytes + batch_bytes <= memory:
            return
        gib = 1 << 30
        need = f"about {(clips_bytes + batch_bytes) / gib:.1f} GiB of memory, more than the {memory / gib:.1f} GiB"
        if clips_bytes >= batch_bytes:
            fit = int((memory - batch_bytes) // (window * frame))
            raise OptionError(
                "frames",
                f"of {self.frames} at {size} px with {window - 1} clips decoded ahead needs "
                f"{need} "
                f"this machine can spare; at most {max(fit, 0)} frames fit (or use fewer "
                "workers).",
            )
        fit = int((memory - clips_bytes) // (4 * frame * 4))
        raise OptionError(
            "batch_size",
            f"of {batch} frames at {size} px needs {need} this machine can spare; at most {max(fit, 0)} fit.",
        )


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
    n_dropped: int = 0  # rows dropped because their clip left the dataset (listed under stale/ in the cache)
    # dropped rows, split repairs and split warnings, folders that could not be read (also in summary_lines)
    notes: list[str] = field(default_factory=list)
    # (folder, reason) for each folder of the dataset that could not be read: its clips were not indexed
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    @property
    def frames_per_second(self) -> float:
        return self.new_frames / self.seconds if self.seconds > 0 else 0.0

    @property
    def clips_per_second(self) -> float:
        return self.n_new / self.seconds if self.seconds > 0 else 0.0


def default_workers() -> int:
    """Decode threads: one per usable CPU core (OpenCV releases the GIL while decoding), at most 32."""
    return max(1, min(32, cpu_count()))


def cache_path(opts: ExtractOptions) -> Path:
    """The file this extraction writes: the cache, or with ``shard`` its shard file beside it."""
    path = Path(opts.output) if opts.output else Path(opts.cache_dir) / f"{get_backbone(opts.backbone).name}.h5"
    return shard_path(path, *parse_shard(opts.shard)) if opts.shard else path


def extract(opts: ExtractOptions | None = None, **kwargs) -> ExtractResult:
    """Extract features for every clip of a dataset into a cache; resume if it exists.

    A clip is extracted unless the cache holds it with the same identity (file size and
    modification time); rows whose clip left the dataset are dropped (listed under ``stale/``);
    a drawn split is repaired over the clips that decoded. Returns an ExtractResult. Raises
    FeatpipeError for user mistakes (including a cache of another dataset), ExtractionFailed if
    no clip could be used (or, with ``strict``, if any failed) -- after the cache is written.
    """
    opts = ExtractOptions(**kwargs) if opts is None else dataclasses.replace(opts, **kwargs)
    shard = parse_shard(opts.shard) if opts.shard else None
    backbone = get_backbone(opts.backbone)
    size = check_size(backbone, opts.size or backbone.default_size)
    dataset = index_dataset(
        opts.data_folder,
        opts.csv,
        val_fraction=opts.val_fraction,
        test_fraction=opts.test_fraction,
        seed=opts.split_seed,
        fold=opts.fold,
    )
    path = cache_path(opts)
    if opts.engine == "ray":
        ray_engine.import_ray()  # before any work: without the extra, say how to install it
    started = time.perf_counter()
    # a shard takes the clips whose key hashes to it: the same split on every machine
    records = (
        [r for r in dataset.records if shard_of(r.video, shard[1]) == shard[0]] if shard else list(dataset.records)
    )
    identities = {r.video: file_identity(r.path) for r in records}  # what each clip file is now
    with ExitStack() as stack:
        stack.enter_context(_collector_skips_what_exists())
        try:
            stack.enter_context(CacheLock(path))
            writable = True
        except CannotWrite:
            if not path.is_file():
                raise
            writable = False  # a finished cache on read-only media: fine if nothing is left to do
        if opts.engine == "ray":  # the actors build the network; the driver's fingerprint is made on a thread
            from featpipe.extraction.ray_engine import DriverBackbone

            extractor = DriverBackbone(backbone, size, opts.weights, opts.seed, opts.batch_size, opts.precision)
        else:
            extractor = FeatureExtractor(backbone, size, opts.weights, opts.seed, opts.batch_size, opts.precision)
        keras = import_keras()

        # weights_fingerprint None: still being computed (--engine ray); settled before anything is written
        config = CacheConfig(
            backbone=backbone.name,
            weights=extractor.weights,
            weights_fingerprint=extractor.fingerprint,
            input_size=size,
            frames=opts.frames,
            sampling=opts.sampling,
            dtype=extractor.cache_dtype(opts.dtype),
            feature_shape=extractor.feature_shape,
            class_names=dataset.class_names,
            extra={
                "featpipe_version": __version__,
                "keras_version": keras.__version__,
                "keras_backend": keras.backend.backend(),
                "data_root": str(dataset.root),
                "layout": dataset.layout,
                "weights_seed": opts.seed,
                "precision": extractor.precision,
                **({"shard": f"{shard[0]}/{shard[1]}"} if shard else {}),
            },  # class_names: the WHOLE dataset's
        )
        writer = CacheWriter(path, config, writable=writable)
        _refuse_another_dataset(writer, identities, dataset.root, path)
        writer.identities = identities  # stamped on every record this run journals
        # rows and failures recorded with the size and mtime each clip file has now (or by a version 1 cache,
        # without identity: trusted, and identified from this run on)
        done, failed_before = writer.standing(identities)
        skip = done | (set() if opts.retry_failed else failed_before)
        todo = [r for r in records if r.video not in skip]
        n_skipped = len(records) - len(todo)

        def fingerprint() -> str:
            """The weights fingerprint, the cache checked against it (CacheError if it was made with other weights)."""
            if writer.config.weights_fingerprint is None:
                writer.settle_fingerprint(extractor.wait())
            return writer.config.weights_fingerprint

        if not writable or not todo:
            fingerprint()
        if not writable:
            return _read_only_result(path, writer, dataset, records, identities, todo, shard, started, opts.strict)
        stats = Stats()
        notes: list[str] = []

        def fold():
            """Cache + journal -> the HDF5 file, with labels and (repaired) splits from the current index."""
            fingerprint()
            assignments, split_notes = _assignments(dataset, records, writer, identities, shard)
            writer.finalize(assignments, current=identities)
            notes[:] = split_notes + _drop_notes(writer)

        if todo:
            extractor.warm_up()  # compile on an accelerator now, as set-up (a no-op on a CPU and for raw)
        setup_seconds = time.perf_counter() - started  # index, model build and compile, cache checks
        try:
            if todo and opts.engine == "ray":
                stats = ray_engine.run(todo, dataset, extractor, opts, writer, keras.__version__, fingerprint)
            elif todo:
                stats = _run(todo, dataset, extractor, opts, writer, workers=opts.workers or default_workers())
        except KeyboardInterrupt:
            if writer.config.weights_fingerprint is not None:  # else nothing was written yet (--engine ray)
                fold()  # Ctrl-C or SIGTERM: keep every finished clip in the cache, then stop
            raise
        finally:
            writer.close()
        fold()
    notes += damaged_notes(stats.damaged)
    seconds = time.perf_counter() - started
    summary = summarize(path)
    notes += _unreadable_notes(dataset)
    result = ExtractResult(
        path,
        summary.n_clips,
        stats.clips,
        n_skipped,
        stats.frames,
        seconds,
        failed=summary.failed,
        summary_lines=summary.lines() + notes,
        batch_size=extractor.batch_size,
        setup_seconds=setup_seconds,
        infer_seconds=stats.infer_seconds,
        starved_seconds=stats.starved_seconds,
        n_dropped=writer.n_dropped,
        notes=notes,
        unreadable=[(str(folder), why) for folder, why in dataset.unreadable],
    )
    if summary.n_clips == 0 and (records or not shard):  # a tiny dataset may leave a shard no clip: not a failure
        if summary.failed:
            raise ExtractionFailed(
                f"No clip could be used ({len(summary.failed)} failed, e.g. {summary.failed[0][0]}: "
                f"{summary.failed[0][1]}). Check that the files are videos OpenCV can decode; the reasons are "
                f"listed in '{path}' under failed/."
            )
        if dataset.unreadable:
            raise ExtractionFailed(f"No clip was extracted into '{path}': {unreadable_note(*dataset.unreadable[0])}")
        raise ExtractionFailed(f"No clip was extracted into '{path}'.")
    _check_strict(opts.strict, summary.failed, dataset, path)
    return result


def _unreadable_notes(dataset: Dataset) -> list[str]:
    """One warning per folder of the dataset that could not be read (its clips are not in the cache)."""
    return [f"warning: {unreadable_note(folder, why)}" for folder, why in dataset.unreadable]


def _check_strict(strict: bool, failed: list, dataset: Dataset, path: Path) -> None:
    """``--strict``: a failed clip or a folder that could not be read fails the run (the cache is written)."""
    if not strict:
        return
    if failed:
        raise ExtractionFailed(
            f"{len(failed)} clip(s) failed and --strict was given (first: {failed[0][0]}: "
            f"{failed[0][1]}). The other clips are saved in '{path}'."
        )
    if dataset.unreadable:
        folder, why = dataset.unreadable[0]
        raise ExtractionFailed(
            f"{len(dataset.unreadable)} folder(s) could not be read and --strict was given (first: '{folder}', "
            f"{why}): their clips were not indexed. The other clips are saved in '{path}'."
        )


@contextmanager
def _collector_skips_what_exists():
    """Inside the block, Python's cyclic garbage collector leaves alone the objects that exist at its start.

    They are the index (a few objects per clip: its record, its path) and live to the end of the run, yet
    every full collection after it (the Keras import alone makes several) would walk all of them again: with
    20,000 clips that was a cost per clip as large as indexing them. ``gc.freeze`` moves them out of the
    collector's reach, ``gc.unfreeze`` puts them back at the end (cyclic garbage among them is collected
    then). Left as it is when something else froze objects already (e.g. a server before forking).
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _refuse_another_dataset(writer: CacheWriter, identities: dict, root: Path, path: Path) -> None:
    """A cache extracted from another folder may be reused only if that folder holds the same clips."""
    attrs = writer.existing_attrs or {}
    old_root = attrs.get("data_root")
    if old_root is None:
        return
    old_root = old_root.decode() if isinstance(old_root, bytes) else str(old_root)
    if old_root == str(root):
        return
    theirs = writer.contents()
    if not theirs:
        return
    new = [k for k in identities if k not in theirs]
    gone = [k for k in theirs if k not in identities]
    changed = [k for k in theirs if k in identities and theirs[k] is not None and theirs[k] != identities[k]]
    if not (new or gone or changed):
        return  # the same clips under a moved folder: data_root follows them
    detail = ", ".join(
        f"{n} {what}"
        for n, what in (
            (len(new), "not in the cache"),
            (len(gone), "missing there"),
            (len(changed), "with other contents"),
        )
        if n
    )
    raise CacheError(
        f"'{path}' was extracted from '{old_root}', and '{root}' holds other clips ({detail}), so it looks like "
        f"another dataset; write its features to a new cache with --output NEW.h5."
    )


def _assignments(
    dataset: Dataset, records: list[Record], writer: CacheWriter, identities: dict, shard
) -> tuple[dict[str, tuple[int, str]], list[str]]:
    """(clip key -> (label, split)) from the current index, the drawn split repaired over the usable clips; notes."""
    splits = {r.video: r.split for r in records}
    notes: list[str] = []
    if not shard:  # a shard sees only its own clips: it cannot tell what a class holds in the whole dataset
        _, failed = writer.standing(identities)
        repair = repair_splits(dataset, [r.video for r in records if r.video not in failed])
        splits.update(repair.splits)
        if repair.redrawn:
            notes.append(
                f"Split drawn again over the usable clips of {', '.join(repair.redrawn)} "
                f"(failed clips had emptied a split)."
            )
        notes += [f"warning: {w}" for w in repair.warnings]
    index = {name: i for i, name in enumerate(dataset.class_names)}  # label_index without a search per clip
    return {
        r.video: (index[r.label] if r.label in index else dataset.label_index(r.label), splits[r.video])
        for r in records
    }, notes


def _drop_notes(writer: CacheWriter) -> list[str]:
    notes = []
    if writer.n_dropped:
        notes.append(
            f"Dropped {writer.n_dropped} row(s) whose clips left the dataset (their names are kept "
            f"under stale/ in the cache)."
        )
    if writer.n_changed:
        notes.append(
            f"Dropped {writer.n_changed} row(s) whose files changed since they were extracted; "
            f"run again to extract them anew."
        )
    return notes


def _read_only_result(
    path: Path,
    writer: CacheWriter,
    dataset: Dataset,
    records: list[Record],
    identities: dict,
    todo: list[Record],
    shard,
    started: float,
    strict: bool = False,
) -> ExtractResult:
    """The cache's folder cannot be written: succeed if the cache is already what this run would write."""
    assignments, notes = _assignments(dataset, records, writer, identities, shard)
    left = []
    if todo:
        left.append(f"{len(todo)} clip(s) to extract")
    if writer.pending:
        left.append("an unfinished journal to fold in")
    with h5py.File(path, "r") as f:
        keys = list(f["video"].asstr()[:])
        labels, splits = f["label"][:], list(f["split"].asstr()[:])
    if any(k not in identities for k in keys):
        left.append("rows whose clips left the dataset to drop")
    if any(k in assignments and assignments[k] != (int(lab), sp) for k, lab, sp in zip(keys, labels, splits)):
        left.append("labels or splits to update")
    if left:
        raise CannotWrite(
            f"Cannot write to '{path.parent}' (read-only), and the cache is not up to date ({', '.join(left)}); "
            f"copy it to a folder you can write to and pass --output there."
        )
    summary = summarize(path)
    notes = notes + [f"'{path.parent}' is read-only, but nothing was left to do: the cache is up to date."]
    notes += _unreadable_notes(dataset)
    _check_strict(strict, summary.failed, dataset, path)
    return ExtractResult(
        path,
        summary.n_clips,
        0,
        len(records),
        0,
        time.perf_counter() - started,
        failed=summary.failed,
        summary_lines=summary.lines() + notes,
        notes=notes,
        unreadable=[(str(folder), why) for folder, why in dataset.unreadable],
    )


def clip_record(done: Embedded, label: int, dtype: np.dtype) -> ClipRecord:
    """What the writer stores for one finished clip (a failed-clip record when it could not be decoded)."""
    rec: Record = done.item
    if not done.ok:
        return ClipRecord(rec.video, label, rec.split, 0, error=done.error)
    clip = done.windows[0]
    feats = done.features[0].astype(dtype)  # raw frames: exact in float32 and back
    check_finite(rec.video, feats, clip.mask, dtype)
    return ClipRecord(rec.video, label, rec.split, clip.n_frames, feats, clip.mask)


def damaged_notes(damaged: dict[str, int], show: int = 10) -> list[str]:
    """One warning for the clips this run found damaged (truncated, a packet the container could not
    read whole): they were kept, sampled from their frames before the damage."""
    if not damaged:
        return []
    listed = ", ".join(f"{key} (from frame {frame})" for key, frame in sorted(damaged.items())[:show])
    more = f" and {len(damaged) - show} more" if len(damaged) > show else ""
    return [
        f"warning: {len(damaged)} clip(s) are damaged (truncated, or unreadable past some frame) and were "
        f"sampled from their frames before the damage only: {listed}{more}. Re-copy or re-encode them and "
        "re-run extract to use the whole clips."
    ]


def check_finite(video: str, feats: np.ndarray, mask: np.ndarray, dtype) -> None:
    """A clip's stored features must be finite on its real frames."""
    if not np.isfinite(feats[mask]).all():
        raise FeatpipeError(
            f"Features of '{video}' are not finite in {np.dtype(dtype).name} (the backbone's outputs overflow it); "
            f"re-run with --dtype float32 and a new --output file."
        )


def _run(
    todo: list[Record],
    dataset: Dataset,
    extractor: FeatureExtractor,
    opts: ExtractOptions,
    writer: CacheWriter,
    workers: int,
) -> Stats:
    """The local engine: ``decode`` (``workers`` threads) -> ``embed`` (batches across clips, the
    backbone on its own thread) -> the writer thread (journal). See :mod:`featpipe.extraction.stages`.

    Ctrl-C or an error: the batch on the device completes, the clips already finished are
    written, the batches still queued are dropped (at most the clips in flight are lost).
    """
    from featpipe.video.decode import read_clip  # lazy: `import featpipe` does not load OpenCV

    dtype = np.dtype(extractor.cache_dtype(opts.dtype))
    stats = Stats()
    clips = decode(todo, lambda rec: read_clip(rec.path, opts.frames, extractor.size, opts.sampling), workers)
    started = time.perf_counter()
    with writing_with_progress(writer, len(todo), f"extract {extractor.backbone.name}", opts.quiet) as (bar, sink):
        for done in embed(clips, extractor, stats):
            sink.put(clip_record(done, dataset.label_index(done.item.label), dtype))
            stats.clips += done.ok
            if done.ok and done.windows[0].damaged_from is not None:
                stats.damaged[done.item.video] = done.windows[0].damaged_from
            bar.update(1)
            bar.set_postfix_str(f"{stats.frames / (time.perf_counter() - started):.1f} frames/s", refresh=False)
    return stats
