"""Stage one: clips -> frozen-backbone features -> HDF5 cache, on the engine the options name.

What every engine shares is here (index, shard, resume, lock, the cache's config and fingerprint,
folding the journal into the file, the result); the engine (:mod:`featpipe.extraction.engines`)
gives the frame source and runs the clips. The local engine: decode workers (threads, --workers)
-> frames batched ACROSS clips (--batch-size frames per forward pass) -> backbone -> background
writer (crash-safe journal); then the atomic HDF5 finalize here.
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

from featpipe._version import __version__
from featpipe.backbones.registry import check_size, get_backbone
from featpipe.cache.lock import CacheLock
from featpipe.cache.reader import summarize
from featpipe.cache.schema import CacheConfig, file_identity
from featpipe.cache.shards import parse_shard, shard_of, shard_path
from featpipe.cache.writer import CacheWriter
from featpipe.errors import CacheError, CannotWrite, ExtractionFailed
from featpipe.extraction.engines.base import Work, get_engine
from featpipe.extraction.options import ExtractOptions
from featpipe.extraction.stages import Stats
from featpipe.runtime.keras_import import import_keras
from featpipe.video.datasets import index_dataset
from featpipe.video.folders import unreadable_note
from featpipe.video.records import Dataset, Record, repair_splits


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


def cache_path(opts: ExtractOptions) -> Path:
    """The file this extraction writes: the cache, or with ``shard`` its shard file beside it."""
    path = Path(opts.output) if opts.output else Path(opts.cache_dir) / f"{get_backbone(opts.backbone).file_stem}.h5"
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
    engine = get_engine(opts.engine)
    engine.check()  # before any work: e.g. without the Ray extra, say how to install it
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
        extractor = engine.source(backbone, size, opts)  # a FrameSource
        keras = import_keras()

        # weights_fingerprint None: still being computed (e.g. --engine ray); settled before anything is written
        config = CacheConfig(
            backbone=backbone.name,
            weights=extractor.weights,
            weights_fingerprint=extractor.fingerprint,
            input_size=size,
            frames=opts.frames,
            sampling=opts.sampling_label,
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
                "decoder": opts.decoder,
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
            if todo:
                stats = engine.run(Work(todo, dataset, extractor, opts, fingerprint), writer)
        except KeyboardInterrupt:
            if writer.config.weights_fingerprint is not None:  # else nothing was written yet (e.g. --engine ray)
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
