"""The local engine: stage one in this process -- decode threads, the backbone, the writer thread.

``decode`` (``--workers`` threads) -> ``embed`` (frames batched across clips, the backbone on its
own thread) -> the writer thread (journal). See :mod:`featpipe.extraction.stages`.
"""

from __future__ import annotations

import time

import numpy as np

from featpipe.backbones.frame_source import FrameSource, frame_source
from featpipe.backbones.registry import Backbone
from featpipe.cache.schema import ClipRecord, padded_times
from featpipe.cache.writer import CacheWriter
from featpipe.extraction.engines.base import Work
from featpipe.extraction.options import ExtractOptions
from featpipe.extraction.stages import Embedded, Stats, check_clip_finite, decode, embed, writing_with_progress
from featpipe.runtime.devices import default_workers
from featpipe.video.records import Record


class LocalEngine:
    """The backbone runs here, on this machine's device (see the module's docstring)."""

    name = "local"

    def check(self) -> None:
        """Nothing to check: the local engine needs no extra."""

    def source(self, backbone: Backbone, size: int, opts: ExtractOptions) -> FrameSource:
        return frame_source(backbone, size, opts.weights, opts.seed, opts.batch_size, opts.precision)

    def run(self, work: Work, writer: CacheWriter) -> Stats:
        """Ctrl-C or an error: the batch on the device completes, the clips already finished are
        written, the batches still queued are dropped (at most the clips in flight are lost).
        """
        from featpipe.video.decode import read_clip  # lazy: `import featpipe` does not load OpenCV

        opts, source = work.opts, work.source
        dtype = np.dtype(source.cache_dtype(opts.dtype))
        stats = Stats()
        workers = opts.workers or default_workers()

        def read(rec):
            return read_clip(rec.path, opts.frames, source.size, opts.sampling, fps=opts.fps, decoder=opts.decoder)

        clips = decode(work.todo, read, workers)
        started = time.perf_counter()
        desc = f"extract {source.backbone.name}"
        with writing_with_progress(writer, len(work.todo), desc, opts.quiet) as (bar, sink):
            for done in embed(clips, source, stats):
                sink.put(clip_record(done, work.dataset.label_index(done.item.label), dtype))
                stats.clips += done.ok
                if done.ok and done.windows[0].damaged_from is not None:
                    stats.damaged[done.item.video] = done.windows[0].damaged_from
                bar.update(1)
                bar.set_postfix_str(f"{stats.frames / (time.perf_counter() - started):.1f} frames/s", refresh=False)
        return stats


def clip_record(done: Embedded, label: int, dtype: np.dtype) -> ClipRecord:
    """What the writer stores for one finished clip (a failed-clip record when it could not be decoded)."""
    rec: Record = done.item
    if not done.ok:
        return ClipRecord(rec.video, label, rec.split, 0, error=done.error)
    clip = done.windows[0]
    feats = done.features[0].astype(dtype)  # raw frames: exact in float32 and back
    check_clip_finite(rec.video, feats, clip.mask, dtype)
    return ClipRecord(
        rec.video,
        label,
        rec.split,
        clip.n_frames,
        feats,
        clip.mask,
        times=padded_times(clip.times, len(clip.mask)),
        duration=float(clip.duration),
        fps=float(clip.fps),
    )


ENGINE = LocalEngine()
