"""Centre-cropping, resizing and padding decoded frames: the same for every decoder."""

from __future__ import annotations

import cv2
import numpy as np

from featpipe.video.plan import check_positive

__all__ = ["center_crop_resize", "pad_frames"]


def center_crop_resize(frame: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop ``frame`` to a square and resize it to ``(size, size, 3)`` uint8 RGB.

    ``frame`` is an OpenCV image: ``HxW`` gray, ``HxWx1`` gray, ``HxWx3`` BGR or ``HxWx4``
    BGRA, uint8. The square's side is ``min(H, W)``; shrinking uses ``INTER_AREA``,
    enlarging ``INTER_LINEAR``.
    """
    check_positive("size", size)
    size = int(size)
    frame = np.asarray(frame)
    if frame.dtype != np.uint8:
        raise ValueError(f"frame must be uint8, got {frame.dtype}")
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    if frame.ndim not in (2, 3) or (frame.ndim == 3 and frame.shape[2] not in (3, 4)):
        raise ValueError(f"frame must be HxW, HxWx1, HxWx3 or HxWx4, got shape {frame.shape}")
    height, width = frame.shape[:2]
    if height < 1 or width < 1:
        raise ValueError(f"frame is empty (shape {frame.shape})")
    side = min(height, width)
    top = (height - side) // 2
    left = (width - side) // 2
    square = np.ascontiguousarray(frame[top : top + side, left : left + side])
    if side != size:
        interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
        square = cv2.resize(square, (size, size), interpolation=interpolation)
    if square.ndim == 2:
        code = cv2.COLOR_GRAY2RGB
    elif square.shape[2] == 4:
        code = cv2.COLOR_BGRA2RGB
    else:
        code = cv2.COLOR_BGR2RGB
    return cv2.cvtColor(square, code)


def pad_frames(frames: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad ``frames`` (``(k, ...)``) along the first axis to ``length``.

    Returns ``(padded, mask)``: ``padded`` is ``(length, ...)`` with the same dtype, real
    frames first; ``mask`` is ``(length,)`` bool, True for the ``k`` real frames. ``k > length``
    is a ValueError (padding never truncates).
    """
    frames = np.asarray(frames)
    if frames.ndim < 1:
        raise ValueError("frames must have at least one dimension (the frame axis)")
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
        raise ValueError(f"length must be a non-negative integer, got {length!r}")
    k = frames.shape[0]
    if k > length:
        raise ValueError(f"cannot pad {k} frames to length {length}: more frames than the length")
    padded = np.zeros((int(length),) + frames.shape[1:], dtype=frames.dtype)
    padded[:k] = frames
    mask = np.zeros(int(length), dtype=bool)
    mask[:k] = True
    return padded, mask
