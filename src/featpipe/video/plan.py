"""Which frames of a clip to keep: by count (uniform, first N) or by time (``fps``), whole or in windows.

Pure functions of the clip's frame count or frame times; every decoder plans with them, so every
decoder keeps the same frames. A frame's *time* is its presentation time in seconds from the
clip's first frame; frame ``i`` is the ``i``-th frame in presentation order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from featpipe.names import SAMPLING

__all__ = [
    "parse_sampling",
    "sampling_label",
    "Plan",
    "check_positive",
    "check_sampling",
    "clip_duration",
    "sample_indices",
    "time_indices",
    "window_indices",
]

# A target time this close to a frame's time is that frame's time (float rounding of pts * time base).
_EPS = 1e-6


def check_sampling(sampling: str) -> None:
    if sampling not in SAMPLING:
        raise ValueError(f"sampling must be one of {', '.join(map(repr, SAMPLING))}, got {sampling!r}")


def check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def sample_indices(n_total: int, frames: int, sampling: str = "uniform") -> np.ndarray:
    """Which frame indices of an ``n_total``-frame clip to keep for a ``frames``-long sequence.

    ``uniform``: ``frames`` indices evenly spaced over the whole clip, first and last frame
    included (``linspace(0, n_total - 1, frames)`` rounded half up; strictly increasing).
    ``first``: the first ``frames`` frames. A clip with at most ``frames`` frames keeps all of
    them (``0 .. n_total - 1``) in both modes. Returns an int64 array, empty when
    ``n_total == 0``.
    """
    check_sampling(sampling)
    check_positive("frames", frames)
    if isinstance(n_total, bool) or not isinstance(n_total, (int, np.integer)) or n_total < 0:
        raise ValueError(f"n_total must be a non-negative integer, got {n_total!r}")
    n_total = int(n_total)
    frames = int(frames)
    if n_total <= frames or sampling == "first":
        return np.arange(min(n_total, frames), dtype=np.int64)
    # n_total > frames >= 1 here. The step (n_total-1)/(frames-1) is > 1 by at least
    # 1/(frames-1), so rounding half up keeps the indices strictly increasing.
    positions = np.linspace(0.0, n_total - 1, frames)
    return np.floor(positions + 0.5).astype(np.int64)


def window_indices(n_total: int, frames: int, sampling: str = "uniform", windows: int = 1) -> list[np.ndarray]:
    """Frame indices of ``windows`` evenly spaced windows, each sampled like a whole clip.

    The clip is cut into ``windows`` equal consecutive segments and ``sample_indices`` is applied
    inside each, so every window looks to a model like one clip of the training data. A clip
    with fewer frames than windows gets one window per frame. Pure.
    """
    check_sampling(sampling)
    check_positive("frames", frames)
    check_positive("windows", windows)
    if n_total <= 0:
        return []
    k = min(int(windows), int(n_total))
    bounds = np.floor(np.linspace(0, n_total, k + 1) + 0.5).astype(np.int64)
    return [start + sample_indices(int(end - start), frames, sampling) for start, end in zip(bounds[:-1], bounds[1:])]


def clip_duration(times: np.ndarray) -> float:
    """Seconds from the first frame's start to the last frame's end: the last frame's time plus the
    clip's typical frame interval (the median gap, so one long pause does not stretch it). 0.0 for
    no frames; a single frame has no interval and a duration of 0.0."""
    times = np.asarray(times, np.float64)
    if times.size == 0:
        return 0.0
    gap = float(np.median(np.diff(times))) if times.size > 1 else 0.0
    return float(times[-1]) + gap


def time_indices(
    times: np.ndarray, fps: float, frames: int, start: float = 0.0, end: float | None = None
) -> np.ndarray:
    """The frames on screen at ``start``, ``start + 1/fps``, ``start + 2/fps``, ... (at most ``frames``
    of them, only times before ``end`` and before the clip ends).

    The frame on screen at time t is the last frame whose time is at most t, so on variable frame rate
    clips, too, each kept frame is the one a viewer sees at that moment; when ``fps`` is above the
    clip's rate, a frame can be on screen at two of those times and is kept twice. Pure.
    """
    check_positive("frames", frames)
    if not (isinstance(fps, (int, float, np.floating)) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    times = np.asarray(times, np.float64)
    if times.size == 0:
        return np.zeros(0, np.int64)
    stop = clip_duration(times) if times.size > 1 else float(times[-1]) + _EPS
    if end is not None:
        stop = min(stop, float(end))
    targets = float(start) + np.arange(int(frames), dtype=np.float64) / float(fps)
    targets = targets[targets < stop - _EPS]
    return (np.searchsorted(times, targets + _EPS, side="right") - 1).clip(0).astype(np.int64)


def sampling_label(sampling: str, fps: float | None = None) -> str:
    """How a cache and a run record the sampling: ``uniform``, ``first``, or ``fps=F`` when sampling by time."""
    return f"fps={float(fps):g}" if fps is not None else sampling


def parse_sampling(label: str) -> tuple[str, float | None]:
    """``(sampling, fps)`` from :func:`sampling_label`'s text (``fps=2`` -> ``("uniform", 2.0)``)."""
    label = str(label)
    if label.startswith("fps="):
        return "uniform", float(label[4:])
    check_sampling(label)
    return label, None


@dataclass(frozen=True)
class Plan:
    """Which frames of a clip to keep, as a function of its frame times.

    ``frames`` per sequence; ``sampling`` ``uniform`` or ``first`` (by count), or by time when ``fps`` is
    set (see :func:`time_indices`). One sequence for the whole clip by default; ``windows`` equal parts
    of the clip by count (each sampled like a whole clip), or ``seconds``: consecutive windows
    ``[0, S), [S, 2S), ...`` by time, as many as the clip has frames for. Calling it with the clip's
    frame times returns one index array per sequence.
    """

    frames: int
    sampling: str = "uniform"
    fps: float | None = None
    windows: int | None = None
    seconds: float | None = None

    def __post_init__(self):
        check_positive("frames", self.frames)
        check_sampling(self.sampling)
        if self.windows is not None:
            check_positive("windows", self.windows)
        for name in ("fps", "seconds"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.windows is not None and self.seconds is not None:
            raise ValueError("give windows or seconds, not both")

    @property
    def needs_times(self) -> bool:
        """Whether the plan depends on the frame times and not only on their count."""
        return self.fps is not None or self.seconds is not None

    def _one(self, times: np.ndarray, lo: int, hi: int, start: float, end: float | None) -> np.ndarray:
        if self.fps is not None:
            return time_indices(times, self.fps, self.frames, start, end)
        return lo + sample_indices(hi - lo, self.frames, self.sampling)

    def __call__(self, times: np.ndarray) -> list[np.ndarray]:
        times = np.asarray(times, np.float64)
        n = int(times.size)
        if n == 0:
            return []
        if self.seconds is not None:
            s = float(self.seconds)
            count = int(math.floor(times[-1] / s + _EPS)) + 1
            out = []
            for w in range(count):
                lo, hi = (int(np.searchsorted(times, (w + k) * s - _EPS)) for k in (0, 1))
                if hi > lo:
                    out.append(self._one(times, lo, hi, w * s, (w + 1) * s))
            return out
        if self.windows is not None:
            if self.fps is None:
                return window_indices(n, self.frames, self.sampling, self.windows)
            k = min(int(self.windows), n)
            bounds = np.floor(np.linspace(0, n, k + 1) + 0.5).astype(np.int64)
            return [
                self._one(times, lo, hi, times[lo], times[hi] if hi < n else None)
                for lo, hi in zip(bounds[:-1], bounds[1:])
            ]
        return [self._one(times, 0, n, 0.0, None)]
