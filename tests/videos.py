"""Helpers that write small test videos (not tests themselves; reused by several test files).

``write_video`` writes frames whose index can be read back after lossy compression, cropping
and resizing: by default frame ``i`` shows ``i`` in binary as :data:`BITS` horizontal bands
(white = 1, black = 0, most significant bit on top) filling the centre square of the frame,
so :func:`frame_index` recovers ``i`` from a frame returned by ``featpipe.video.decode.read_clip``
(whatever the aspect ratio, since the centre crop keeps the centre square). Black/white bands
survive MPEG-4 and Motion-JPEG compression; checked for 64- to 96-pixel frames read at sizes
16 to 64.

Writers for bad inputs (``write_zero_byte``, ``write_text_as_video``, ``write_truncated``,
``write_no_frames``) and for odd-but-valid ones (``write_1x1``, ``write_wide``, ``write_gray``,
``write_odd_size``) live here as well.

Notes from measuring OpenCV's FFmpeg writer (opencv-python-headless 4.x):
* it rounds odd frame sizes down to even (97x61 is stored and decoded as 96x60);
* ``mp4v`` refuses 1x1 frames, so ``write_1x1`` uses Motion-JPEG in AVI;
* decoders always return 3-channel BGR, also for videos written with ``is_color=False``;
* MP4 keeps its index (moov atom) at the end, so a truncated MP4 cannot be opened at all,
  while a truncated AVI still opens, reports the header's frame count and decodes fewer frames.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

BITS = 8  # frame indices 0 .. 255 can be encoded

FOURCC_BY_SUFFIX = {".mp4": "mp4v", ".avi": "MJPG", ".mkv": "mp4v"}


def index_frame(i: int, width: int, height: int, is_color: bool = True) -> np.ndarray:
    """The default frame ``i``: ``i`` in binary as bands in the centre square (BGR or gray)."""
    if not 0 <= i < 2**BITS:
        raise ValueError(f"frame index {i} does not fit in {BITS} bits")
    frame = np.zeros((height, width), np.uint8)
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    for bit in range(BITS):
        if (i >> (BITS - 1 - bit)) & 1:
            y0 = top + bit * side // BITS
            y1 = top + (bit + 1) * side // BITS
            frame[y0:y1, left : left + side] = 255
    return np.dstack([frame] * 3) if is_color else frame


def frame_index(rgb: np.ndarray) -> int:
    """Read back the index from a square RGB frame showing :func:`index_frame`'s bands."""
    size = rgb.shape[0]
    gray = np.asarray(rgb, dtype=np.float64).mean(axis=2)
    value = 0
    for bit in range(BITS):
        y = int((bit + 0.5) * size / BITS)
        level = gray[y, size // 4 : size - size // 4].mean()
        value = (value << 1) | int(level > 127)
    return value


def write_video(
    path: str | Path,
    n_frames: int,
    width: int,
    height: int,
    fps: float = 15,
    color_fn: Callable[[int], object] | None = None,
    is_color: bool = True,
    fourcc: str | None = None,
) -> Path:
    """Write ``n_frames`` frames of ``width`` x ``height`` to ``path`` and return the path.

    ``color_fn(i)`` gives frame ``i``: a full image (``HxWx3`` BGR, or ``HxW`` when
    ``is_color`` is False), or a BGR triple / gray scalar for a flat frame. Without it, frame
    ``i`` is :func:`index_frame`. The codec defaults from the suffix (``.mp4`` -> mp4v,
    ``.avi`` -> MJPG). Names with spaces or non-ASCII characters work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    code = fourcc or FOURCC_BY_SUFFIX.get(path.suffix.lower(), "mp4v")
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*code), float(fps), (width, height), is_color)
    if not writer.isOpened():
        raise RuntimeError(f"cv2.VideoWriter cannot write {path} ({code}, {width}x{height})")
    try:
        for i in range(n_frames):
            if color_fn is None:
                frame = index_frame(i, width, height, is_color)
            else:
                value = color_fn(i)
                arr = np.asarray(value, dtype=np.uint8)
                if arr.ndim >= 2:
                    frame = arr
                else:
                    shape = (height, width, 3) if is_color else (height, width)
                    frame = np.empty(shape, np.uint8)
                    frame[...] = arr
            writer.write(np.ascontiguousarray(frame))
    finally:
        writer.release()
    return path


# ------------------------------------------------------------------------------ bad inputs


def write_zero_byte(path: str | Path) -> Path:
    path = Path(path)
    path.write_bytes(b"")
    return path


def write_text_as_video(path: str | Path) -> Path:
    """A text file with a video name (e.g. ``notes.mp4``)."""
    path = Path(path)
    path.write_text("This is not a video, just text with a video file name.\n" * 20, encoding="utf-8")
    return path


def write_truncated(path: str | Path, src: str | Path, fraction: float = 0.5) -> Path:
    """Copy the first ``fraction`` of the bytes of the valid video ``src`` to ``path``."""
    path = Path(path)
    data = Path(src).read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def write_no_frames(path: str | Path, width: int = 64, height: int = 64) -> Path:
    """A real container (AVI, whatever ``path`` is named) that opens but holds no frame."""
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_file = os.path.join(tmp, "empty.avi")
        writer = cv2.VideoWriter(tmp_file, cv2.VideoWriter_fourcc(*"MJPG"), 15.0, (width, height))
        if not writer.isOpened():
            raise RuntimeError("cv2.VideoWriter cannot write an empty AVI")
        writer.release()
        shutil.copyfile(tmp_file, path)
    return path


# ---------------------------------------------------------------------- odd but valid inputs


def write_1x1(path: str | Path, n_frames: int = 5) -> Path:
    """1x1 frames (Motion-JPEG in AVI: mp4v refuses 1x1; the container follows the codec)."""
    return write_video(path, n_frames, 1, 1, color_fn=lambda i: (40 * i, 100, 200), fourcc="MJPG")


def write_wide(path: str | Path, n_frames: int = 6) -> Path:
    """Very wide 400x8 frames."""
    return write_video(path, n_frames, 400, 8)


def write_gray(path: str | Path, n_frames: int = 6, width: int = 64, height: int = 64) -> Path:
    """Written from 2-D gray frames (``is_color=False``)."""
    return write_video(path, n_frames, width, height, is_color=False)


def write_odd_size(path: str | Path, n_frames: int = 6) -> Path:
    """Asked for 97x61 (OpenCV's writer stores it as 96x60)."""
    return write_video(path, n_frames, 97, 61)


def write_av(
    path: str | Path,
    codec: str,
    n_frames: int,
    width: int = 96,
    height: int = 64,
    fps: int = 15,
    gop: int = 12,
    times: list[float] | None = None,
    options: dict[str, str] | None = None,
    first: int = 0,
) -> Path:
    """Write :func:`index_frame` frames (frame ``i`` shows ``first + i`` modulo 256) with PyAV's encoder
    ``codec`` (``libx264``, ``mpeg4``, ``mjpeg``, ``libvpx-vp9``, ``ffv1``), the container from the suffix,
    a keyframe every ``gop`` frames.

    ``times`` (seconds, increasing) gives each frame its own presentation time, for variable frame
    rate clips (time base 1/1000); without it frame ``i`` is shown at ``i / fps``. ``options`` are
    added to the encoder's (``{"bf": "2"}`` for B-frames with libx264).
    """
    import av

    path = Path(path)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        opts = {"g": str(gop)}
        if codec == "libx264":
            opts.update({"keyint_min": str(gop), "sc_threshold": "0", "preset": "ultrafast"})
        if codec == "libvpx-vp9":
            opts.update({"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"})
        opts.update(options or {})
        stream.options = opts
        if times is not None:
            from fractions import Fraction

            stream.codec_context.time_base = Fraction(1, 1000)
        for i in range(n_frames):
            rgb = index_frame((first + i) % 2**BITS, width, height)[:, :, ::-1].copy()
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if times is not None:
                frame.pts = round(times[i] * 1000)
                from fractions import Fraction

                frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path
