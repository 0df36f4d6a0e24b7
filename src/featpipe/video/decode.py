"""Decoding clips into fixed-length, cropped, resized RGB frame sequences.

This is the only featpipe module that decodes video with OpenCV. Everything else works on
:class:`ClipFrames`.

How a clip is read
------------------
Frames are decoded strictly sequentially (no seeking: ``CAP_PROP_POS_FRAMES`` is unreliable
with many codecs and containers). ``cap.grab()`` advances one frame; ``cap.retrieve()``,
which does the colour conversion, is called only for frames that are kept, and each kept
frame is cropped and resized at once, so memory is ``O(frames * size * size)`` whatever the
clip length.

``CAP_PROP_FRAME_COUNT`` comes from the container and can be wrong (truncated files, streams
longer than their header says) or missing (0 or -1). It is only used to *plan* which frames
to keep; the stream is always read to its end to learn the true count. When the true count
shows the plan was wrong, the plan is redone with the true count and, only if frames that
were not retrieved are now needed, the clip is read a second time. When no count is reported
at all, a counting pass (``grab`` only) comes first. The result is always what reading with
the true count known in advance would give.

Verifying what OpenCV returns
-----------------------------
OpenCV's FFmpeg backend does not say when a packet fails to decode, and some builds (seen with
opencv-python-headless 5.1) then count the packet as a frame and hand back the *previous* picture:
a truncated AVI's last frame showed the frame before it. So every grabbed frame's timestamp
(``CAP_PROP_POS_MSEC``) is recorded and must increase; and when a pass finds another frame count
than the container reports (how a truncated or damaged file shows itself) or a timestamp that goes
back, a demux-only pass with PyAV (packets are read, nothing is decoded) finds the first packet the
container could not read whole (FFmpeg flags a short read as corrupt) and the presentation time
from which frames depend on it. The clip ends, as a *damaged* clip, at the first frame that cannot
be verified, and ``ClipFrames.damaged_from`` says where. Whole clips whose count matches cost no
extra pass. Frames before it are exactly the frames asked for; no
frame from the damaged part is ever returned, whatever OpenCV or FFmpeg build is installed.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from featpipe.errors import VideoError
from featpipe.names import DECODERS, SAMPLING
from featpipe.video.crop import center_crop_resize, pad_frames
from featpipe.video.plan import Plan, check_positive, clip_duration, sample_indices, window_indices

__all__ = [
    "DECODERS",
    "SAMPLING",
    "ClipFrames",
    "center_crop_resize",
    "count_frames",
    "damage_time",
    "pad_frames",
    "read_clip",
    "read_planned",
    "read_timeline",
    "read_windows",
    "sample_indices",
    "window_indices",
    "write_gif",
]


# How many times a clip may be (re)read before the decoder is declared inconsistent. A normal
# clip takes one pass; a wrong reported count takes two; a missing one takes two.
_MAX_PASSES = 3


@dataclass(frozen=True)
class ClipFrames:
    """Frames sampled from one clip.

    ``frames`` is ``(T, size, size, 3)`` uint8 RGB; rows where ``mask`` is False are all zero.
    ``mask`` is ``(T,)`` bool and True exactly for real frames, always a prefix.
    ``n_frames`` is the number of frames decoded in the whole clip (verified by reading).
    ``indices`` is ``(mask.sum(),)`` int64: the clip frame indices that were kept, in order.
    ``fps`` is the container's frame rate (0.0 when the container reports none).
    ``width`` and ``height`` are the size of the decoded frames before cropping.
    ``damaged_from`` is None for a whole clip; for a damaged one (truncated, a packet the container
    could not read) it is the index of the first frame that could not be verified: ``n_frames``
    equals it, and only frames before it were sampled.
    ``times`` is ``(mask.sum(),)`` float64: each kept frame's presentation time in seconds from the
    clip's first frame. ``duration`` is the clip's length in seconds (:func:`~featpipe.video.plan.clip_duration`).
    ``decoder`` says which reader decoded it: ``pyav`` (seeking) or ``opencv`` (sequential).
    """

    frames: np.ndarray
    mask: np.ndarray
    n_frames: int
    indices: np.ndarray
    fps: float
    width: int
    height: int
    damaged_from: int | None = None  # first frame index that could not be verified (the clip is cut there)
    times: np.ndarray | None = None
    duration: float = 0.0
    decoder: str = "opencv"


# --------------------------------------------------------------------------------------------
# Decoding


def _api_preference() -> int:
    # Name FFmpeg explicitly where it exists: with CAP_ANY, other backends may claim the path
    # (CAP_IMAGES reads names containing '%' as an image-sequence pattern).
    try:
        if cv2.videoio_registry.hasBackend(cv2.CAP_FFMPEG):
            return cv2.CAP_FFMPEG
    except (AttributeError, cv2.error):
        pass
    return cv2.CAP_ANY


def _check_file(path: Path) -> None:
    try:  # stat can itself be refused: a folder on the way may be listed but not entered
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise VideoError(f"video file not found: {path}. Check the path and that the file exists.") from None
    except PermissionError as exc:
        raise VideoError(
            f"cannot read video file {path}: permission denied (a folder on its path may not be entered); "
            "give your user access (e.g. chmod a+rX on the folders, a+r on the file) or remove it from the dataset."
        ) from exc
    except OSError as exc:
        raise VideoError(f"cannot read video file {path}: {exc.strerror or exc}.") from exc
    if stat.S_ISDIR(st.st_mode):
        raise VideoError(f"{path} is a folder, not a video file.")
    size = st.st_size
    if size == 0:
        raise VideoError(f"video file {path} is empty (0 bytes); re-copy or re-download it.")
    try:  # a file we may not read is not "not a video file": say what is wrong with it
        os.close(os.open(path, os.O_RDONLY))
    except PermissionError as exc:
        raise VideoError(
            f"cannot read video file {path}: permission denied; give your user read access "
            "(e.g. chmod a+r) or remove it from the dataset."
        ) from exc
    except OSError as exc:
        raise VideoError(f"cannot read video file {path}: {exc.strerror or exc}.") from exc


def _open(path: Path) -> cv2.VideoCapture:
    try:
        cap = cv2.VideoCapture(str(path), _api_preference())
        opened = cap.isOpened()
    except cv2.error as exc:
        raise VideoError(f"OpenCV failed to open {path} as a video: {exc}") from exc
    if not opened:
        cap.release()
        raise VideoError(
            f"cannot open {path} as a video: it is not a video file, is truncated or damaged, "
            "or uses a codec this OpenCV build cannot decode. Re-encode it (e.g. to H.264 MP4) "
            "or remove it from the dataset."
        )
    return cap


def _no_frames(path: Path) -> VideoError:
    return VideoError(
        f"{path} opened as a video but has no decodable frame; the file is empty, damaged or "
        "uses an unsupported codec. Re-encode it or remove it from the dataset."
    )


def _damaged_at_start(path: Path) -> VideoError:
    return VideoError(
        f"{path} is damaged from its first frame (the container could not read it whole); "
        "re-copy or re-encode it, or remove it from the dataset."
    )


def _reported_count(cap: cv2.VideoCapture) -> int:
    value = cap.get(cv2.CAP_PROP_FRAME_COUNT)
    if not np.isfinite(value) or value <= 0:
        return 0
    return int(round(value))


def _fps(cap: cv2.VideoCapture) -> float:
    value = float(cap.get(cv2.CAP_PROP_FPS))
    return value if np.isfinite(value) and value > 0 else 0.0


def damage_time(path: str | Path) -> float | None:
    """Seconds from the start of ``path``'s video stream from which its frames cannot be trusted.

    A demux-only pass with PyAV (nothing is decoded): the first packet that FFmpeg could not read
    whole (``is_corrupt``: a truncated file, a short read) damages every frame presented at or
    after the earliest presentation time among it and the packets that follow it in decode order.
    None when every packet is whole, or when PyAV is not installed or cannot read the container
    (then only OpenCV's own checks apply).
    """
    try:
        import av
    except ImportError:  # pragma: no cover - av is a dependency; an install without it keeps OpenCV's checks
        return None
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return None
            stream = container.streams.video[0]
            start = stream.start_time or 0
            base = float(stream.time_base) if stream.time_base else 0.0
            damaged, earliest, latest = False, None, None
            for packet in container.demux(stream):
                if packet.size == 0:  # the flush packet at the end
                    continue
                when = packet.pts if packet.pts is not None else packet.dts
                if not damaged and packet.is_corrupt:
                    damaged = True
                if damaged:
                    if when is None:  # no time at all: the damage starts right after the last timed packet
                        when = latest + 1 if latest is not None else start
                    earliest = when if earliest is None else min(earliest, when)
                elif when is not None:
                    latest = when if latest is None else max(latest, when)
            if not damaged or base <= 0:
                return None if not damaged else 0.0
            return max(0.0, (earliest - start) * base)
    except (av.error.FFmpegError, OSError, ValueError, IndexError):
        return None


class _Verifier:
    """Checks each grabbed frame's timestamp (see the module doc): it must not go backwards, and,
    once the damage time is known, must lie before it. Records the times so that a damage time
    learned after a pass can still cut it."""

    def __init__(self, cap: cv2.VideoCapture, fps: float, damage: float | None = None):
        self.cap = cap
        self.fps = fps
        self.times: list[float] = []
        self.limit_ms: float | None = None
        self.last_ms: float | None = None
        self.set_damage(damage)

    def set_damage(self, damage: float | None) -> None:
        # half a frame of slack before the damage time; 1 ms when the rate is unknown
        self.limit_ms = None if damage is None else damage * 1000.0 - (500.0 / self.fps if self.fps > 0 else 1.0)

    def ok(self) -> bool:
        ms = float(self.cap.get(cv2.CAP_PROP_POS_MSEC))
        if not np.isfinite(ms):
            ms = -1.0  # no time: only the damage limit can judge it, and only by count
        if self.limit_ms is not None and (ms >= self.limit_ms or ms < 0):
            return False
        if self.last_ms is not None and 0 < ms < self.last_ms:
            return False  # time went backwards: the decoder lost its place
        if ms > 0:
            self.last_ms = ms
        self.times.append(ms)
        return True

    def first_damaged(self) -> int | None:
        """Index of the first recorded frame at or past the damage limit (None: none of them)."""
        if self.limit_ms is None:
            return None
        for index, ms in enumerate(self.times):
            if ms >= self.limit_ms or ms < 0:
                return index
        return None


def _verify_count(path: Path, verifier: _Verifier, count: int, stopped: bool, reported: int) -> tuple[int, bool]:
    """The verified frame count after a pass that grabbed ``count`` frames, and whether the clip is damaged.

    Whole clips cost nothing more: the container is demuxed (:func:`damage_time`) only when the pass
    stopped at a frame that failed its checks, or found another count than the container reports,
    which is how a truncated or damaged file shows itself.
    """
    if not stopped and count == reported:
        return count, False
    if verifier.limit_ms is None:
        verifier.set_damage(damage_time(path))
    cut = verifier.first_damaged()
    if cut is not None and cut < count:
        return cut, True
    return count, stopped


def _count(cap: cv2.VideoCapture, verifier: _Verifier) -> tuple[int, bool]:
    """Frames grabbed until the end of the stream or the first that fails verification; and
    whether it stopped at such a frame (the clip is damaged there)."""
    n = 0
    while cap.grab():
        if not verifier.ok():
            return n, True
        n += 1
    return n, False


def _read_pass(
    cap: cv2.VideoCapture, path: Path, wanted: np.ndarray, size: int, verifier: _Verifier
) -> tuple[int, dict[int, np.ndarray], tuple[int, int] | None, bool]:
    """Read the whole stream once; retrieve, crop and resize only the ``wanted`` frames.

    Returns ``(true_count, {index: frame}, (height, width) of the first retrieved frame, damaged)``.
    Wanted indices past the end of the stream are simply absent from the dict. The pass stops at
    the first frame that fails verification (``damaged`` is then True and ``true_count`` is its index).
    """
    keep = {int(i) for i in wanted}
    kept: dict[int, np.ndarray] = {}
    shape: tuple[int, int] | None = None
    index = 0
    while cap.grab():
        if not verifier.ok():
            return index, kept, shape, True
        if index in keep:
            ok, frame = cap.retrieve()
            if not ok or frame is None or frame.size == 0:
                raise VideoError(
                    f"frame {index} of {path} was found but could not be decoded; the file is "
                    "damaged. Re-encode it or remove it from the dataset."
                )
            if shape is None:
                shape = (int(frame.shape[0]), int(frame.shape[1]))
            kept[index] = center_crop_resize(frame, size)
        index += 1
    return index, kept, shape, False


def _check_decoder(decoder: str) -> None:
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(map(repr, DECODERS))}, got {decoder!r}")


def read_clip(
    path: str | Path,
    frames: int,
    size: int,
    sampling: str = "uniform",
    *,
    fps: float | None = None,
    decoder: str = "auto",
) -> ClipFrames:
    """Decode ``frames`` frames of the clip at ``path`` as ``(frames, size, size, 3)`` RGB.

    See :func:`sample_indices` for which frames are kept, or :func:`~featpipe.video.plan.time_indices`
    when ``fps`` is given (the frames on screen at 0, 1/fps, 2/fps, ...). A clip with fewer frames
    to keep is zero-padded (``mask`` False on padding). ``decoder``: ``auto`` or ``pyav`` (seek to the
    frames kept; clips that cannot be sought reliably are read sequentially) or ``opencv`` (read every
    frame in order); all give the same frames. Raises :class:`VideoError`, naming the file, when the
    clip cannot be read; ``ValueError`` on bad arguments.
    """
    return read_planned(path, Plan(frames, sampling, fps), size, decoder)[0]


def read_windows(
    path: str | Path,
    frames: int,
    size: int,
    sampling: str = "uniform",
    windows: int = 1,
    *,
    fps: float | None = None,
    decoder: str = "auto",
) -> list[ClipFrames]:
    """Decode ``windows`` evenly spaced windows of a (long) clip, each read the way a whole clip is.

    Each window is a :class:`ClipFrames` of ``frames`` frames sampled inside its segment (``n_frames``
    is the whole clip's count). ``windows=1`` equals :func:`read_clip`.
    """
    return read_planned(path, Plan(frames, sampling, fps, windows=windows), size, decoder)


def read_timeline(
    path: str | Path,
    frames: int,
    size: int,
    seconds: float,
    sampling: str = "uniform",
    *,
    fps: float | None = None,
    decoder: str = "auto",
) -> list[ClipFrames]:
    """Decode consecutive windows ``[0, S), [S, 2S), ...`` (``S = seconds``) of a clip, each sampled the
    way a whole clip is; window ``w`` starts at ``w * seconds``. Every frame needed is read once."""
    return read_planned(path, Plan(frames, sampling, fps, seconds=seconds), size, decoder)


def read_planned(path: str | Path, plan: Plan, size: int, decoder: str = "auto") -> list[ClipFrames]:
    """The frame sequences ``plan`` asks for, decoded by ``decoder`` (see :func:`read_clip`)."""
    check_positive("size", size)
    _check_decoder(decoder)
    path = Path(path)
    _check_file(path)
    if decoder != "opencv":
        result = _read_seeking(path, plan, int(size), required=decoder == "pyav")
        if result is not None:
            return result
    try:
        return _read_planned(path, plan, int(size))
    except cv2.error as exc:
        raise VideoError(f"OpenCV failed while decoding {path}: {exc}") from exc


def _read_seeking(path: Path, plan: Plan, size: int, required: bool) -> list[ClipFrames] | None:
    """The seeking decoder's result, or None when the clip is to be read sequentially."""
    try:
        import av

        from featpipe.video.seek import Unreliable, read_seeking
    except ImportError:
        if required:
            raise VideoError("--decoder pyav needs PyAV: pip install av (or use --decoder opencv).") from None
        return None
    try:
        final, kept, times, fps, shape = read_seeking(path, size, plan)
    except (Unreliable, av.error.FFmpegError, OSError, ValueError, IndexError, MemoryError):
        return None  # the sequential reader reads it, with its checks for damaged files
    return _assemble(plan, final, kept, times, fps, shape, len(times), None, "pyav")


def _assemble(plan, final, kept, times, fps, shape, count, damaged, decoder) -> list[ClipFrames]:
    duration = clip_duration(times)
    out = []
    for idx in final:
        real = np.stack([kept[int(i)] for i in idx])
        padded, mask = pad_frames(real, plan.frames)
        out.append(
            ClipFrames(
                frames=padded,
                mask=mask,
                n_frames=int(count),
                indices=idx.astype(np.int64),
                fps=fps,
                width=shape[1],
                height=shape[0],
                damaged_from=int(count) if damaged else None,
                times=times[idx].astype(np.float64),
                duration=duration,
                decoder=decoder,
            )
        )
    return out


def _frame_times(verifier: _Verifier, count: int, fps: float, plan: Plan, path: Path) -> np.ndarray:
    """Seconds from the first frame, from the timestamps OpenCV reported for the first ``count`` frames.

    A clip whose frames carry no usable timestamps (none, or not increasing) is timed by its container's
    frame rate; sampling by time refuses it (its times would be a guess).
    """
    ms = np.asarray(verifier.times[:count], np.float64)
    if ms.size and not np.any(ms < 0) and (ms.size == 1 or np.all(np.diff(ms) > 0)):
        return (ms - ms[0]) / 1000.0
    if plan.needs_times:
        raise VideoError(
            f"{path}'s frames have no usable timestamps, so it cannot be sampled by time; re-encode it "
            "(e.g. to H.264 MP4), sample it by count (no --fps), or remove it from the dataset."
        )
    return np.arange(count, dtype=np.float64) / fps if fps > 0 else np.full(count, np.nan)


def _read_planned(path: Path, plan: Plan, size: int) -> list[ClipFrames]:
    """Read the frames that ``plan`` asks for sequentially, in one pass when the container's frame count
    is right and the plan needs only the count, with a counting pass first when the plan needs the
    frame times or the container has no count, and a second pass when the count was wrong."""
    cap = _open(path)
    try:
        fps = _fps(cap)
        reported = planned_count = _reported_count(cap)
        limit_ms: float | None = None  # the damage limit, learned (once) when a pass shows the clip may be damaged
        planned_times = None
        if planned_count == 0 or plan.needs_times:
            # Count first (learning every frame's time), then read with the true count.
            verifier = _Verifier(cap, fps)
            planned_count, stopped = _count(cap, verifier)
            planned_count, _ = _verify_count(path, verifier, planned_count, stopped, reported)
            limit_ms = verifier.limit_ms
            if planned_count == 0:
                raise _no_frames(path)
            planned_times = _frame_times(verifier, planned_count, fps, plan, path)
            cap.release()
            cap = _open(path)
        kept: dict[int, np.ndarray] = {}
        shape: tuple[int, int] | None = None
        for _ in range(_MAX_PASSES):
            wanted = plan(planned_times if planned_times is not None else np.arange(planned_count, dtype=np.float64))
            wanted = np.concatenate(wanted)
            verifier = _Verifier(cap, fps)
            verifier.limit_ms = limit_ms
            true_count, kept, pass_shape, stopped = _read_pass(cap, path, wanted, size, verifier)
            true_count, damaged = _verify_count(path, verifier, true_count, stopped, reported)
            limit_ms = verifier.limit_ms
            kept = {i: frame for i, frame in kept.items() if i < true_count}
            shape = shape or pass_shape
            if true_count == 0:
                raise _damaged_at_start(path) if damaged else _no_frames(path)
            times = _frame_times(verifier, true_count, fps, plan, path)
            final = plan(times)
            if all(int(i) in kept for idx in final for i in idx):
                break
            # The reported count was wrong and frames we did not retrieve are needed:
            # read again, planning with the count we now know.
            planned_count, planned_times = true_count, times
            cap.release()
            cap = _open(path)
        else:
            raise VideoError(
                f"{path} gives a different number of frames each time it is decoded; the file "
                "is damaged. Re-encode it or remove it from the dataset."
            )
    finally:
        cap.release()

    if shape is None:  # frame 0 is kept by every sampling, so this means nothing was retrieved
        raise _no_frames(path)
    return _assemble(plan, final, kept, times, fps, shape, true_count, damaged, "opencv")


def write_gif(frames: np.ndarray, path: str | Path, caption: str, fps: float = 4.0) -> Path:
    """An animated GIF of RGB frames (k, H, W, 3) with ``caption`` drawn on every frame."""
    path = Path(path)
    images = []
    for frame in frames:
        img = cv2.resize(np.ascontiguousarray(frame), (256, 256), interpolation=cv2.INTER_NEAREST)
        cv2.rectangle(img, (0, 226), (256, 256), (0, 0, 0), thickness=-1)
        cv2.putText(img, caption[:40], (6, 247), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
        images.append(Image.fromarray(img))
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


def count_frames(path: str | Path) -> int:
    """Number of frames in the clip at ``path``, found by decoding the whole stream (up to the
    first frame that cannot be verified, for a damaged clip: see the module doc).

    Returns 0 for a video that opens but has no decodable frame; raises :class:`VideoError`
    when the file is missing, empty or cannot be opened as a video.
    """
    path = Path(path)
    _check_file(path)
    try:
        cap = _open(path)
        try:
            verifier = _Verifier(cap, _fps(cap))
            count, stopped = _count(cap, verifier)
            return _verify_count(path, verifier, count, stopped, _reported_count(cap))[0]
        finally:
            cap.release()
    except cv2.error as exc:
        raise VideoError(f"OpenCV failed while decoding {path}: {exc}") from exc
