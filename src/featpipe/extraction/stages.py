"""Stage one's stages, joined by iterators: ``decode(items) -> embed(clips, source) -> writer``.

``featpipe extract`` (local engine), ``featpipe predict`` and the Ray engine all drive these same
stages; none of them re-implements batching across clips or scattering features back.

* :func:`decode` -- decoding in a pool of threads, in input order, a bounded window ahead.
  A clip that cannot be decoded comes out as a :class:`Decoded` with ``error`` set: per-clip
  errors are records, never exceptions.
* :func:`embed` -- the real frames of consecutive clips stacked into batches of
  ``source.batch_size`` frames, one frame-source call per batch on its own thread (so the next
  batch is assembled while the device computes), features scattered back to their clips. Yields
  an :class:`Embedded` per clip as soon as its last frame is through (errors pass straight on).
  For a video-native source (``clip_frames`` K > 1) it feeds whole chunks of K consecutive frames of
  one window, never mixing clips (see :func:`embed`).
* :class:`BackgroundWriter` -- finished clips appended to the cache's journal on a thread.

A *frame source* (:class:`featpipe.backbones.frame_source.FrameSource`) is what turns uint8 frames
into per-frame features: a network or the ``raw`` entry's frames themselves. The stages only use
its ``batch_size``, ``feature_shape``, ``clip_frames`` and ``__call__``. :func:`check_clip_finite` is the check every
engine applies to a clip's features before they are written.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from featpipe.cache.finite import non_finite_rows
from featpipe.errors import FeatpipeError, VideoError


@dataclass
class Decoded:
    """One item's decoded windows (extract: exactly one), or why it could not be decoded."""

    item: Any  # the caller's key for this clip (a Record, a path, an index)
    windows: list = field(default_factory=list)  # ClipFrames, one per window
    error: str | None = None


@dataclass
class Embedded:
    """One item's per-frame features: ``features[w, t]`` for window ``w``, frame ``t`` (zeros where masked)."""

    item: Any
    windows: list = field(default_factory=list)  # the decoded ClipFrames (mask, n_frames, frames)
    features: np.ndarray | None = None  # (windows, T, *feature_shape) float32; None when error is set
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Stats:
    """Where the stages' time went."""

    frames: int = 0  # real frames through the frame source
    clips: int = 0  # clips finished (by the caller)
    infer_seconds: float = 0.0  # time inside frame-source calls
    starved_seconds: float = 0.0  # time the source's thread waited for a batch, after its first one
    damaged: dict = field(default_factory=dict)  # clip key -> first frame that could not be verified (kept the rest)


def decode(items: Iterable, read: Callable[[Any], Any], workers: int) -> Iterator[Decoded]:
    """``read(item)`` in ``workers`` threads, results in input order, at most ``2 * workers`` ahead.

    ``read`` returns one ClipFrames or a list of them (windows); a VideoError or OSError it raises
    becomes ``Decoded.error``, never empty. Closing the iterator cancels what has not started.
    """

    def run(item):
        try:
            out = read(item)
        except VideoError as exc:
            return Decoded(item, error=str(exc) or f"cannot be decoded ({type(exc).__name__})")
        except OSError as exc:  # the file system refused a read: this clip fails, the others go on
            reason = "permission denied" if isinstance(exc, PermissionError) else exc.strerror or str(exc)
            where = f" {exc.filename}" if exc.filename else ""
            return Decoded(item, error=f"cannot read video file{where}: {reason or type(exc).__name__}.")
        return Decoded(item, list(out) if isinstance(out, (list, tuple)) else [out])

    window = max(2 * workers, 4)
    items = iter(items)
    inflight: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="featpipe-decode") as pool:

        def submit_next():
            for item in items:
                inflight.append(pool.submit(run, item))
                return

        for _ in range(window):
            submit_next()
        try:
            while inflight:
                result = inflight.popleft().result()
                submit_next()
                yield result
        finally:
            for fut in inflight:
                fut.cancel()


@dataclass
class _Slot:
    """A decoded clip waiting for its frames' features."""

    decoded: Decoded
    features: np.ndarray  # (windows, T, *feature_shape) float32, filled as batches come back
    remaining: int  # real frames not yet through the source

    def result(self) -> Embedded:
        return Embedded(self.decoded.item, self.decoded.windows, self.features)


def embed(decoded: Iterable[Decoded], source, stats: Stats | None = None) -> Iterator[Embedded]:
    """Features for decoded clips: frames batched ACROSS clips, one ``source`` call per batch.

    The source runs on its own thread with the next batch waiting (a queue of two), so it never
    idles while a batch is stacked. Clips come out when their last frame is through, errors at
    once: the order is not the input order. Closing the iterator (Ctrl-C, an error downstream)
    lets the batch in the source finish and drops the queued ones.

    A video-native source (``source.clip_frames`` K > 1) embeds chunks of K consecutive frames of one
    window: each window's real frames (a prefix of its mask) are queued rounded UP to a multiple of K, the
    tail of the last chunk filled by repeating the last real frame (never the zero frames a window is padded
    with, which the model would attend to), and only whole chunks are sent. The filler positions' features
    are dropped: masked positions keep zero features, real frames never see a padding frame.
    """
    stats = stats if stats is not None else Stats()
    batch_size = source.batch_size
    k = int(getattr(source, "clip_frames", 1))
    if batch_size % k:
        raise ValueError(f"a batch of {batch_size} frames is not whole chunks of {k}")
    infer_q: queue.Queue = queue.Queue(maxsize=2)
    done_q: queue.Queue = queue.Queue()  # finished clips, drained by this generator
    errors: list[BaseException] = []  # from the source's thread, re-raised here
    stop = threading.Event()

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
                feats = source(batch)
                stats.infer_seconds += time.perf_counter() - t0
                for owner, f in zip(owners, feats):
                    if owner is None:  # a chunk's filler (the last real frame repeated): dropped
                        continue
                    slot, w, pos = owner
                    slot.features[w, pos] = f
                    slot.remaining -= 1
                    if slot.remaining == 0:
                        done_q.put(slot.result())
            except BaseException as exc:  # surfaced in the consumer's thread, never swallowed
                errors.append(exc)
                stop.set()
                return
            stats.frames += sum(owner is not None for owner in owners)

    thread = threading.Thread(target=infer_loop, name="featpipe-backbone", daemon=True)
    thread.start()
    pending_frames: list[np.ndarray] = []  # frames waiting for a batch
    # (slot, window, frame position) per pending frame; None for the filler that completes a chunk
    pending_owner: list[tuple[_Slot, int, int] | None] = []

    def flush(n: int) -> Iterator[Embedded]:
        nonlocal pending_frames, pending_owner
        item = (np.stack(pending_frames[:n]), pending_owner[:n])
        pending_frames, pending_owner = pending_frames[n:], pending_owner[n:]
        while True:  # a bounded put that notices a dead source thread
            if errors:  # the clips finished before the failure still go out, then the error
                yield from finished()
                raise errors[0]
            try:
                infer_q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def finished() -> Iterator[Embedded]:
        while True:
            try:
                yield done_q.get_nowait()
            except queue.Empty:
                return

    try:
        for clip in decoded:
            yield from finished()
            if clip.error is not None:
                yield Embedded(clip.item, error=clip.error)
                continue
            t = len(clip.windows[0].mask) if clip.windows else 0
            slot = _Slot(clip, np.zeros((len(clip.windows), t, *source.feature_shape), np.float32), 0)
            for w, window in enumerate(clip.windows):
                real = int(window.mask.sum())  # real frames are a prefix
                for pos in range(real):
                    pending_frames.append(window.frames[pos])
                    pending_owner.append((slot, w, pos))
                    slot.remaining += 1
                if real % k:  # complete the window's last chunk with its last real frame
                    pending_frames.extend([window.frames[real - 1]] * (k - real % k))
                    pending_owner.extend([None] * (k - real % k))
            if slot.remaining == 0:
                yield slot.result()
                continue
            while len(pending_frames) >= batch_size:  # batch_size is whole chunks, and so is what is pending
                yield from flush(batch_size)
        if pending_frames:
            yield from flush(len(pending_frames))
        _put_until_taken(infer_q, None, thread)
        thread.join()
        yield from finished()
        if errors:
            raise errors[0]
    finally:
        stop.set()
        _put_until_taken(infer_q, None, thread)
        thread.join()


class BackgroundWriter:
    """The writer stage: ``put(ClipRecord)`` hands a finished clip to a thread that appends it to the journal.

    ``close()`` writes everything already handed over (also after Ctrl-C) and re-raises the
    writer's error, if any. Use as a context manager.
    """

    def __init__(self, writer, depth: int = 64):
        self._writer = writer
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._loop, name="featpipe-writer", daemon=True)
        self._thread.start()

    def _loop(self):
        while True:
            rec = self._q.get()
            if rec is None:
                return
            try:
                self._writer.append(rec)
            except BaseException as exc:  # surfaced in the caller's thread, never swallowed
                self._errors.append(exc)
                return

    def put(self, record) -> None:
        while True:
            if self._errors:
                raise self._errors[0]
            try:
                self._q.put(record, timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        _put_until_taken(self._q, None, self._thread)
        self._thread.join()
        if self._errors:
            raise self._errors[0]

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # keep what was handed over; the original exception wins
            _put_until_taken(self._q, None, self._thread)
            self._thread.join()


@contextmanager
def writing_with_progress(writer, total: int, desc: str, quiet: bool):
    """``(bar, sink)``: a tqdm bar over ``total`` clips and a :class:`BackgroundWriter` into ``writer``,
    the pair every engine writes its clips through."""
    from tqdm.auto import tqdm  # lazy: it loads asyncio, 20 ms more for every `featpipe --help`

    with (
        tqdm(total=total, unit="clip", disable=quiet, dynamic_ncols=True, desc=desc) as bar,
        BackgroundWriter(writer) as sink,
    ):
        yield bar, sink


def _put_until_taken(q: queue.Queue, item, consumer: threading.Thread) -> None:
    """Put ``item`` on a bounded queue unless its consumer thread has already ended."""
    while consumer.is_alive():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def check_clip_finite(video: str, feats: np.ndarray, mask: np.ndarray, dtype) -> None:
    """A clip's features, as stored in ``dtype``, must be finite on its real frames (``mask``); every engine checks."""
    if non_finite_rows(feats)[mask].any():
        raise FeatpipeError(
            f"Features of '{video}' are not finite in {np.dtype(dtype).name} (the backbone's outputs overflow it); "
            f"re-run with --dtype float32 and a new --output file."
        )
