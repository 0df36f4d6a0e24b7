"""The seeking decoder: PyAV reads only the stretches of a clip that hold the frames kept.

Which frames to keep is planned on the clip's frame times (see :mod:`featpipe.video.plan`), and
frame ``i`` means what it means to the sequential reader in :mod:`featpipe.video.decode`: the
``i``-th frame in presentation order. So the decoder first learns every frame's presentation
timestamp (pts), without decoding:

- from the container's index where it lists every frame (MP4/MOV, AVI with an index) and the
  frames are evenly spaced (constant frame rate): frame ``i`` is shown at ``pts0 + i * step``,
  with ``pts0`` the first decoded frame's pts. This costs nothing beyond opening the file;
- otherwise (Matroska/WebM, whose index lists keyframes only; variable frame rate; no count in
  the container) from one demux-only pass over the packets: their pts, sorted. Packets are read,
  nothing is decoded, so this costs a small fraction of sequential decoding.

Then, for the wanted frames in order, it seeks to the keyframe at or before each one and decodes
forward; when no keyframe lies between the last decoded frame and the next wanted one, it reads
on instead of seeking. Every decoded frame's pts is checked against the table: the frame returned
for index ``i`` is the frame shown at ``i``'s time or the clip is not read this way.

Anything that makes the result doubtful -- a file shorter than its index says, a packet the
container could not read whole, a packet with no timestamp, a decoding error, a frame whose pts is
not where the table says, a rotated stream -- raises :class:`Unreliable`, and the caller reads the
clip with the sequential reader instead, which has the full checks for damaged files. Frames are
converted to BGR and cropped exactly as the sequential reader does, so the two agree up to
colour-conversion rounding. Memory is the kept frames plus one integer per frame of the clip.
"""

from __future__ import annotations

import os
from operator import attrgetter
from pathlib import Path

import numpy as np

from featpipe.video.crop import center_crop_resize

__all__ = ["Unreliable", "read_seeking"]


class Unreliable(Exception):
    """This clip cannot be read by seeking with confidence; read it sequentially."""


def _index_table(stream, path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(pts offsets of every frame from the first, keyframe offsets), from the container's index, or
    None when the index does not list every frame at an even spacing (then demux)."""
    count = int(stream.frames or 0)
    if count <= 0:
        return None
    entries = stream.index_entries
    if len(entries) != count:
        return None
    # one pass over the entries (each is a Python object: on a 10-minute clip this pass is most of the cost)
    rows = np.array(list(map(attrgetter("timestamp", "is_keyframe", "is_discard", "pos", "size"), entries)), np.int64)
    ts = rows[:, 0]
    if rows[:, 2].any():
        return None
    if int((rows[:, 3] + rows[:, 4]).max()) > os.path.getsize(path):  # truncated: the index promises missing bytes
        raise Unreliable("the file is shorter than its index")
    steps = np.diff(np.sort(ts))
    if count > 1 and (steps[0] <= 0 or np.any(steps != steps[0])):
        return None  # variable frame rate (or duplicate times): learn the exact times by demuxing
    step = int(steps[0]) if count > 1 else 1
    key_offsets = np.sort(ts[rows[:, 1].astype(bool)] - ts.min())
    return np.arange(count, dtype=np.int64) * step, key_offsets


def _demux_table(container, stream) -> tuple[np.ndarray, np.ndarray]:
    """(every frame's pts, keyframe pts), sorted, from one pass over the packets (nothing decoded)."""
    pts: list[int] = []
    keys: list[int] = []
    for packet in container.demux(stream):
        if packet.size == 0:  # the flush packet at the end
            continue
        if packet.is_corrupt:
            raise Unreliable("a packet the container could not read whole")
        if packet.pts is None:
            raise Unreliable("a packet without a presentation time")
        pts.append(packet.pts)
        if packet.is_keyframe:
            keys.append(packet.pts)
    if not pts:
        raise Unreliable("no packets")
    table = np.sort(np.asarray(pts, np.int64))
    if np.any(np.diff(table) <= 0):
        raise Unreliable("two frames with the same presentation time")
    return table, np.sort(np.asarray(keys, np.int64))


class _Decoder:
    """Forward decoding with seeks, checking each frame's pts."""

    def __init__(self, container, stream):
        self.container = container
        self.stream = stream
        self.frames = container.decode(stream)
        self.last: int | None = None  # pts of the last frame decoded (None: none since the last seek)

    def first(self):
        frame = self._next()
        if frame is None:
            raise Unreliable("no frame decoded")
        if getattr(frame, "rotation", 0):  # a stream property, carried by every frame: checked once
            raise Unreliable("a rotated stream")  # the sequential reader applies the rotation
        return frame

    def _next(self):
        try:
            frame = next(self.frames)
        except StopIteration:
            return None
        if frame.pts is None:
            raise Unreliable("a frame without a presentation time")
        if self.last is not None and frame.pts <= self.last:
            raise Unreliable("frames out of order")
        self.last = frame.pts
        return frame

    def seek(self, pts: int) -> None:
        self.container.seek(int(pts), backward=True, any_frame=False, stream=self.stream)
        self.frames = self.container.decode(self.stream)
        self.last = None

    def forward_to(self, pts: int):
        """Decode on to the frame shown at ``pts``; None when a later frame comes first (after a seek
        that landed too late), Unreliable at the end of the stream."""
        while True:
            frame = self._next()
            if frame is None:
                raise Unreliable("the stream ended before a frame its index lists")
            if frame.pts == pts:
                return frame
            if frame.pts > pts:
                return None


def read_seeking(
    path: Path, size: int, plan
) -> tuple[list[np.ndarray], dict[int, np.ndarray], np.ndarray, float, tuple[int, int]]:
    """Read the frames ``plan(times)`` asks for by seeking.

    Returns ``(index arrays, {index: cropped RGB frame}, times of every frame in seconds from the
    first, fps, (height, width))``. Raises :class:`Unreliable` (read it sequentially) or PyAV's
    errors (the caller treats them alike).
    """
    import av
    from av.video.reformatter import VideoReformatter

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise Unreliable("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        base = stream.time_base
        if not base:
            raise Unreliable("no time base")
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        decoder = _Decoder(container, stream)
        table = _index_table(stream, path)
        if table is None:
            pts, keys = _demux_table(container, stream)
            decoder.seek(int(pts[0]))
            first = decoder.first()
            if first.pts != pts[0]:
                raise Unreliable("the first frame is not where the packets say")
        else:
            first = decoder.first()
            offsets, key_offsets = table
            pts, keys = offsets + first.pts, key_offsets + first.pts
        times = (pts - pts[0]).astype(np.float64) * float(base)
        final = plan(times)
        wanted = sorted({int(i) for idx in final for i in idx})
        kept: dict[int, np.ndarray] = {}
        shape: tuple[int, int] | None = None

        # One converter for the clip, on this thread: a fresh one per frame (to_ndarray's default) costs
        # ten times the conversion. Unscaled, swscale gives the sequential reader's pixels exactly.
        reformatter = VideoReformatter()

        def keep(index: int, frame) -> None:
            nonlocal shape
            image = reformatter.reformat(frame, format="bgr24", threads=1).to_ndarray()
            shape = shape or (int(image.shape[0]), int(image.shape[1]))
            kept[index] = center_crop_resize(image, size)

        pending = wanted
        if pending and pending[0] == 0:
            keep(0, first)
            pending = pending[1:]
        for index in pending:
            target = int(pts[index])
            # the latest keyframe at or before the target; seek only when it lies past the last frame decoded
            k = int(np.searchsorted(keys, target, side="right")) - 1
            key = int(keys[k]) if k >= 0 else int(pts[0])
            frame = None
            if decoder.last is not None and key <= decoder.last:
                frame = decoder.forward_to(target)
                if frame is None:
                    raise Unreliable("a frame missing where the table has one")
            else:
                for _attempt in range(3):  # a seek may land past the target (open GOPs): try earlier keyframes
                    decoder.seek(key)
                    frame = decoder.forward_to(target)
                    if frame is not None:
                        break
                    k -= 1
                    key = int(keys[k]) if k >= 0 else int(pts[0])
                if frame is None:
                    raise Unreliable("seeking does not reach the frame")
            keep(index, frame)
        if shape is None:
            raise Unreliable("nothing decoded")
        return final, kept, times, fps, shape
