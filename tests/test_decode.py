"""featpipe.video.decode: frame sampling, cropping, padding and robust decoding."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest

from featpipe.errors import VideoError
from featpipe.video.decode import (
    SAMPLING,
    ClipFrames,
    center_crop_resize,
    count_frames,
    damage_time,
    pad_frames,
    read_clip,
    read_windows,
    sample_indices,
)
from videos import (
    frame_index,
    write_1x1,
    write_gray,
    write_no_frames,
    write_odd_size,
    write_text_as_video,
    write_truncated,
    write_video,
    write_wide,
    write_zero_byte,
)

# ------------------------------------------------------------------------- sample_indices


@pytest.mark.parametrize("n_total", [20, 21, 37, 100, 141, 1000])
@pytest.mark.parametrize("frames", [1, 2, 7, 20])
def test_uniform_indices_span_first_to_last_and_strictly_increase(n_total, frames):
    idx = sample_indices(n_total, frames, "uniform")
    assert idx.dtype == np.int64
    assert len(idx) == frames
    assert idx[0] == 0
    if frames > 1:
        assert idx[-1] == n_total - 1
    assert np.all(np.diff(idx) > 0)
    assert idx.min() >= 0 and idx.max() < n_total


def test_uniform_indices_strictly_increase_for_every_long_enough_clip():
    for frames in range(1, 33):
        for n_total in range(frames, frames + 200):
            idx = sample_indices(n_total, frames)
            assert len(idx) == frames and np.all(np.diff(idx) > 0), (n_total, frames)


@pytest.mark.parametrize(
    ("n_total", "frames", "expected"),
    [
        (10, 4, [0, 3, 6, 9]),
        (100, 5, [0, 25, 50, 74, 99]),
        (141, 8, [0, 20, 40, 60, 80, 100, 120, 140]),
        (7, 1, [0]),
        (21, 20, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]),
        (20, 20, list(range(20))),
    ],
)
def test_uniform_indices_exact_values(n_total, frames, expected):
    assert sample_indices(n_total, frames, "uniform").tolist() == expected


def test_uniform_is_the_default_sampling():
    assert sample_indices(100, 5).tolist() == sample_indices(100, 5, "uniform").tolist()


@pytest.mark.parametrize("sampling", SAMPLING)
def test_clip_shorter_than_sequence_keeps_all_frames(sampling):
    assert sample_indices(5, 8, sampling).tolist() == [0, 1, 2, 3, 4]
    assert sample_indices(1, 20, sampling).tolist() == [0]


@pytest.mark.parametrize("sampling", SAMPLING)
def test_zero_frame_clip_gives_no_indices(sampling):
    idx = sample_indices(0, 8, sampling)
    assert idx.shape == (0,) and idx.dtype == np.int64


def test_first_sampling_is_a_prefix():
    assert sample_indices(100, 8, "first").tolist() == list(range(8))
    assert sample_indices(8, 8, "first").tolist() == list(range(8))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((10, 4, "random"), "sampling"),
        ((10, 0, "uniform"), "frames"),
        ((10, -3, "first"), "frames"),
        ((-1, 4, "uniform"), "n_total"),
    ],
)
def test_sample_indices_rejects_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        sample_indices(*args)


# ------------------------------------------------------------------------------ pad_frames


def test_pad_frames_zero_pads_and_masks_real_frames_as_prefix():
    frames = np.full((3, 2, 2, 3), 7, np.uint8)
    padded, mask = pad_frames(frames, 5)
    assert padded.shape == (5, 2, 2, 3) and padded.dtype == np.uint8
    assert mask.dtype == bool and mask.tolist() == [True, True, True, False, False]
    assert np.all(padded[:3] == 7) and np.all(padded[3:] == 0)


def test_pad_frames_exact_length_and_empty_input():
    frames = np.arange(12, dtype=np.float32).reshape(4, 3)
    padded, mask = pad_frames(frames, 4)
    assert np.array_equal(padded, frames) and mask.all() and padded.dtype == np.float32
    padded, mask = pad_frames(np.zeros((0, 3), np.float32), 2)
    assert padded.shape == (2, 3) and not mask.any()


def test_pad_frames_refuses_more_frames_than_length():
    with pytest.raises(ValueError, match="more frames than the length"):
        pad_frames(np.zeros((6, 2)), 5)


# ---------------------------------------------------------------------- center_crop_resize

GREEN, RED = (0, 255, 0), (0, 0, 255)  # BGR


def _centre_marked(height: int, width: int) -> np.ndarray:
    """BGR frame: the centre square green, everything outside it red."""
    frame = np.empty((height, width, 3), np.uint8)
    frame[...] = RED
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    frame[top : top + side, left : left + side] = GREEN
    return frame


@pytest.mark.parametrize(("height", "width"), [(40, 100), (100, 40), (61, 97), (97, 61), (50, 50)])
@pytest.mark.parametrize("size", [16, 40, 80])
def test_center_crop_keeps_exactly_the_centre_square(height, width, size):
    out = center_crop_resize(_centre_marked(height, width), size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    # All green in RGB order: nothing of the red margins survives the crop.
    assert np.all(out[..., 1] == 255) and np.all(out[..., 0] == 0) and np.all(out[..., 2] == 0)


def test_center_crop_of_wide_frame_is_centred():
    # Columns 0..99 carry their own index; the 40-wide centre starts at column 30.
    frame = np.repeat(np.arange(100, dtype=np.uint8)[None, :, None], 40, axis=0).repeat(3, axis=2)
    out = center_crop_resize(frame, 40)
    assert out[0, :, 0].tolist() == list(range(30, 70))


def test_bgr_is_converted_to_rgb():
    blue_bgr = np.zeros((30, 30, 3), np.uint8)
    blue_bgr[..., 0] = 255
    out = center_crop_resize(blue_bgr, 10)
    assert np.all(out[..., 2] == 255) and np.all(out[..., :2] == 0)


def test_gray_frames_become_three_equal_channels():
    gray = np.tile(np.arange(0, 240, 4, dtype=np.uint8), (60, 1))
    for frame in (gray, gray[:, :, None]):
        out = center_crop_resize(frame, 20)
        assert out.shape == (20, 20, 3)
        assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
        assert out.max() > out.min()


def test_bgra_frames_drop_alpha_and_become_rgb():
    bgra = np.zeros((24, 32, 4), np.uint8)
    bgra[...] = (255, 10, 20, 128)
    out = center_crop_resize(bgra, 12)
    assert out.shape == (12, 12, 3)
    assert out[0, 0].tolist() == [20, 10, 255]


def test_tiny_and_very_wide_frames():
    pixel = np.array([[[10, 20, 30]]], np.uint8)
    out = center_crop_resize(pixel, 8)
    assert out.shape == (8, 8, 3) and np.all(out == [30, 20, 10])
    wide = np.random.default_rng(0).integers(0, 256, (8, 400, 3), dtype=np.uint8)
    assert center_crop_resize(wide, 32).shape == (32, 32, 3)


def test_same_size_square_is_only_colour_converted():
    frame = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert np.array_equal(center_crop_resize(frame, 16), frame[..., ::-1])


def test_shrinking_averages_fine_detail_instead_of_sampling_it():
    stripes = np.zeros((96, 96, 3), np.uint8)
    stripes[:, 1::3] = 255  # one bright column in three: sampling would keep pure black and white columns
    out = center_crop_resize(stripes, 32)
    assert np.allclose(out, 255 / 3, atol=2), "each output pixel is the mean of the three it covers"


def test_enlarging_blends_neighbours_into_a_ramp_not_blocks():
    step = np.zeros((8, 8, 3), np.uint8)
    step[:, 4:] = 255
    row = center_crop_resize(step, 64)[32, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert (np.diff(row) >= 0).all(), "no ringing: values only rise across the edge"
    assert ((row > 0) & (row < 255)).sum() >= 4, "the edge is a ramp of blended values"


def test_center_crop_resize_rejects_bad_input():
    with pytest.raises(ValueError, match="size"):
        center_crop_resize(np.zeros((4, 4, 3), np.uint8), 0)
    with pytest.raises(ValueError, match="uint8"):
        center_crop_resize(np.zeros((4, 4, 3), np.float32), 4)
    with pytest.raises(ValueError, match="shape"):
        center_crop_resize(np.zeros((4, 4, 2), np.uint8), 4)


# ------------------------------------------------------------------------------- read_clip


@pytest.fixture
def clip50(tmp_path) -> Path:
    return write_video(tmp_path / "clip50.mp4", 50, 96, 64, fps=15)


def _decoded_indices(clip: ClipFrames) -> list[int]:
    return [frame_index(f) for f in clip.frames[clip.mask]]


def test_read_clip_uniform_selects_evenly_spaced_frames(clip50):
    clip = read_clip(clip50, 8, 32, "uniform")
    assert isinstance(clip, ClipFrames)
    assert clip.frames.shape == (8, 32, 32, 3) and clip.frames.dtype == np.uint8
    assert clip.mask.all() and clip.mask.dtype == bool
    assert clip.indices.dtype == np.int64
    assert clip.indices.tolist() == [0, 7, 14, 21, 28, 35, 42, 49]
    assert _decoded_indices(clip) == clip.indices.tolist()
    assert clip.n_frames == 50
    assert clip.fps == pytest.approx(15.0)
    assert (clip.width, clip.height) == (96, 64)


def test_read_clip_first_selects_the_first_frames(clip50):
    clip = read_clip(clip50, 8, 32, "first")
    assert clip.indices.tolist() == list(range(8))
    assert _decoded_indices(clip) == list(range(8))
    assert clip.n_frames == 50  # still counted to the end


@pytest.mark.parametrize("sampling", SAMPLING)
def test_short_clip_keeps_every_frame_and_is_zero_padded(tmp_path, sampling):
    path = write_video(tmp_path / "short.mp4", 5, 64, 64)
    clip = read_clip(path, 8, 32, sampling)
    assert clip.frames.shape == (8, 32, 32, 3)
    assert clip.mask.tolist() == [True] * 5 + [False] * 3
    assert clip.indices.tolist() == [0, 1, 2, 3, 4]
    assert _decoded_indices(clip) == [0, 1, 2, 3, 4]
    assert not clip.frames[5:].any()
    assert clip.n_frames == 5


def test_read_clip_accepts_str_paths(clip50):
    assert read_clip(str(clip50), 4, 16).n_frames == 50


def test_long_clip_retrieves_only_kept_frames(tmp_path, monkeypatch):
    path = write_video(tmp_path / "long.mp4", 240, 64, 64)
    calls = {"grab": 0, "retrieve": 0}
    real_grab, real_retrieve = cv2.VideoCapture.grab, cv2.VideoCapture.retrieve

    def grab(self, *args):
        calls["grab"] += 1
        return real_grab(self, *args)

    def retrieve(self, *args):
        calls["retrieve"] += 1
        return real_retrieve(self, *args)

    monkeypatch.setattr(cv2.VideoCapture, "grab", grab)
    monkeypatch.setattr(cv2.VideoCapture, "retrieve", retrieve)
    clip = read_clip(path, 6, 32, decoder="opencv")
    assert clip.n_frames == 240
    assert calls["retrieve"] == 6
    assert calls["grab"] == 241  # one pass: 240 frames and the failing grab at the end
    assert _decoded_indices(clip) == sample_indices(240, 6).tolist()


def test_long_clip_memory_stays_bounded_by_kept_frames(tmp_path):
    # Holding all 240 frames of 192x128x3 peaks at 17.7 MB; reading one frame at a time and
    # keeping 4 of them at 32x32 peaks at about two decoded frames (measured: 0.16 MB).
    path = write_video(tmp_path / "long_big.mp4", 240, 192, 128)
    tracemalloc.start()
    try:
        read_clip(path, 4, 32)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 192 * 128 * 3, f"peak {peak} bytes: frames are being accumulated"


def _fake_frame_count(monkeypatch, value: float) -> None:
    real_get = cv2.VideoCapture.get

    def get(self, prop):
        if prop == cv2.CAP_PROP_FRAME_COUNT:
            return float(value)
        return real_get(self, prop)

    monkeypatch.setattr(cv2.VideoCapture, "get", get)


def _assert_same_clip(a: ClipFrames, b: ClipFrames) -> None:
    assert a.n_frames == b.n_frames
    assert a.indices.tolist() == b.indices.tolist()
    assert a.mask.tolist() == b.mask.tolist()
    assert np.array_equal(a.frames, b.frames)
    assert (a.fps, a.width, a.height) == (b.fps, b.width, b.height)


@pytest.mark.parametrize("reported", [0, -1, 3, 37, 49, 51, 90, 1000])
@pytest.mark.parametrize(("frames", "sampling"), [(8, "uniform"), (8, "first"), (60, "uniform"), (60, "first")])
def test_wrong_reported_frame_count_gives_the_true_count_result(clip50, monkeypatch, reported, frames, sampling):
    truth = read_clip(clip50, frames, 16, sampling)
    _fake_frame_count(monkeypatch, reported)
    assert cv2.VideoCapture(str(clip50)).get(cv2.CAP_PROP_FRAME_COUNT) == reported  # the fake is active
    _assert_same_clip(read_clip(clip50, frames, 16, sampling, decoder="opencv"), truth)


def _count_opens(monkeypatch) -> list[str]:
    """Record every ``cv2.VideoCapture(...)`` made from now on (one per pass over the clip)."""
    opened = []
    real_capture = cv2.VideoCapture

    def counting_capture(*args):  # a factory: subclassing cv2.VideoCapture can crash OpenCV
        opened.append(str(args[0]) if args else "")
        return real_capture(*args)

    monkeypatch.setattr(cv2, "VideoCapture", counting_capture)
    return opened


def test_correct_frame_count_reads_the_clip_once(clip50, monkeypatch):
    opened = _count_opens(monkeypatch)
    read_clip(clip50, 8, 16, decoder="opencv")
    assert len(opened) == 1


def test_too_large_frame_count_rereads_with_the_true_count(clip50, monkeypatch):
    _fake_frame_count(monkeypatch, 80)
    opened = _count_opens(monkeypatch)
    clip = read_clip(clip50, 8, 16, decoder="opencv")
    assert len(opened) == 2
    assert clip.indices.tolist() == sample_indices(50, 8).tolist()
    assert _decoded_indices(clip) == clip.indices.tolist()


def test_missing_frame_count_counts_first(clip50, monkeypatch):
    _fake_frame_count(monkeypatch, 0)
    opened = _count_opens(monkeypatch)
    clip = read_clip(clip50, 8, 16, decoder="opencv")
    assert len(opened) == 2
    assert _decoded_indices(clip) == sample_indices(50, 8).tolist()


def test_wrong_count_that_does_not_change_the_kept_frames_needs_no_second_pass(clip50, monkeypatch):
    _fake_frame_count(monkeypatch, 30)  # 'first' keeps frames 0..7 whether the clip has 30 or 50
    opened = _count_opens(monkeypatch)
    clip = read_clip(clip50, 8, 16, "first", decoder="opencv")
    assert len(opened) == 1
    assert clip.n_frames == 50


def test_truncated_avi_reports_more_frames_than_it_decodes(tmp_path):
    src = write_video(tmp_path / "full.avi", 60, 64, 64)
    path = write_truncated(tmp_path / "cut.avi", src, 0.7)
    cap = cv2.VideoCapture(str(path))
    reported = cap.get(cv2.CAP_PROP_FRAME_COUNT)
    cap.release()
    assert reported == 60
    clip = read_clip(path, 8, 32)
    assert 0 < clip.n_frames < 60
    assert clip.n_frames == count_frames(path)
    assert clip.indices.tolist() == sample_indices(clip.n_frames, 8).tolist()
    assert _decoded_indices(clip) == clip.indices.tolist()
    # the last packet was cut short: the clip is reported damaged there and ends before it
    assert clip.damaged_from == clip.n_frames


def _stale_after(monkeypatch, bad: int) -> None:
    """Make OpenCV behave as opencv-python-headless 5.1 does on a packet it cannot decode: grab()
    succeeds and retrieve() returns the previous picture, for every frame from ``bad`` on."""
    real_retrieve, real_get = cv2.VideoCapture.retrieve, cv2.VideoCapture.get
    last: dict[int, np.ndarray] = {}

    def retrieve(self, *args):
        index = int(real_get(self, cv2.CAP_PROP_POS_FRAMES)) - 1  # the frame just grabbed
        if index >= bad and id(self) in last:
            return True, last[id(self)].copy()
        ok, frame = real_retrieve(self, *args)
        if ok:
            last[id(self)] = frame
        return ok, frame

    monkeypatch.setattr(cv2.VideoCapture, "retrieve", retrieve)


@pytest.mark.parametrize("sampling", SAMPLING)
def test_a_decoder_repeating_the_previous_picture_on_a_damaged_packet_never_leaks_it(tmp_path, monkeypatch, sampling):
    src = write_video(tmp_path / "full.avi", 60, 64, 64)
    path = write_truncated(tmp_path / "cut.avi", src, 0.7)
    whole = damage_time(path)
    assert whole is not None and whole > 0
    first_bad = round(whole * 15)  # written at 15 fps
    _stale_after(monkeypatch, first_bad)
    clip = read_clip(path, 60, 32, sampling, decoder="opencv")
    assert clip.damaged_from == first_bad == clip.n_frames
    assert _decoded_indices(clip) == list(range(first_bad))  # every frame is the one asked for
    assert count_frames(path) == first_bad
    windows = read_windows(path, 4, 32, sampling, windows=3, decoder="opencv")
    assert all(w.damaged_from == first_bad for w in windows)
    assert [_decoded_indices(w) for w in windows] == [w.indices.tolist() for w in windows]


def test_time_that_goes_backwards_cuts_the_clip_there(clip50, monkeypatch):
    real_get = cv2.VideoCapture.get

    def get(self, prop):
        value = real_get(self, prop)
        if prop == cv2.CAP_PROP_POS_MSEC and real_get(self, cv2.CAP_PROP_POS_FRAMES) > 30:
            return value - 1000.0  # the decoder lost its place: frame 30 claims a time before frame 29
        return value

    monkeypatch.setattr(cv2.VideoCapture, "get", get)
    clip = read_clip(clip50, 8, 16, decoder="opencv")
    assert clip.damaged_from == 30 == clip.n_frames
    assert _decoded_indices(clip) == sample_indices(30, 8).tolist()


def test_whole_clips_are_not_damaged(tmp_path):
    for suffix in (".mp4", ".avi", ".mkv"):
        path = write_video(tmp_path / f"whole{suffix}", 40, 64, 48)
        assert damage_time(path) is None
        clip = read_clip(path, 8, 32)
        assert clip.damaged_from is None and clip.n_frames == 40
        assert _decoded_indices(clip) == clip.indices.tolist()


@pytest.mark.parametrize("name", ["v_Basketball_g01_c01.avi", "abseiling_k400.mp4", "v_GGSY1Qvo990.mp4"])
def test_real_clips_are_whole(real_fixtures, name):
    path = real_fixtures / name
    assert damage_time(path) is None
    clip = read_clip(path, 16, 32)
    assert clip.damaged_from is None and clip.n_frames == count_frames(path)


def test_count_frames_reads_the_stream(clip50, monkeypatch):
    _fake_frame_count(monkeypatch, 7)
    assert count_frames(clip50) == 50


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"frames": 0}, "frames"), ({"size": 0}, "size"), ({"sampling": "middle"}, "sampling")],
)
def test_read_clip_rejects_bad_arguments_before_touching_the_file(tmp_path, kwargs, message):
    args = {"frames": 8, "size": 32, "sampling": "uniform", **kwargs}
    with pytest.raises(ValueError, match=message):
        read_clip(tmp_path / "does-not-exist.mp4", **args)


# ------------------------------------------------------------------------------ bad inputs


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = write_video(tmp_path / "good.mp4", 30, 64, 64)
    return {
        "missing": (tmp_path / "missing.mp4", "not found"),
        "zero_byte": (write_zero_byte(tmp_path / "empty.mp4"), "empty"),
        "text": (write_text_as_video(tmp_path / "notes.mp4"), "cannot open"),
        "truncated_mp4": (write_truncated(tmp_path / "cut.mp4", good, 0.5), "cannot open"),
        "no_frames": (write_no_frames(tmp_path / "noframes.avi"), "no decodable frame"),
        "folder": (tmp_path, "folder"),
    }


@pytest.mark.parametrize("kind", ["missing", "zero_byte", "text", "truncated_mp4", "no_frames", "folder"])
def test_bad_input_raises_video_error_naming_the_file(tmp_path, kind):
    path, reason = _bad_inputs(tmp_path)[kind]
    with pytest.raises(VideoError) as info:
        read_clip(path, 8, 32)
    message = str(info.value)
    assert str(path) in message
    assert reason in message


@pytest.mark.parametrize("kind", ["missing", "zero_byte", "text", "truncated_mp4"])
def test_count_frames_raises_video_error_for_unreadable_files(tmp_path, kind):
    path, _ = _bad_inputs(tmp_path)[kind]
    with pytest.raises(VideoError, match="cannot open|not found|empty"):
        count_frames(path)


def test_count_frames_of_container_without_frames_is_zero(tmp_path):
    assert count_frames(write_no_frames(tmp_path / "none.avi")) == 0


def test_no_frames_with_a_video_name_is_still_a_video_error(tmp_path):
    path = write_no_frames(tmp_path / "empty stream.mp4")
    with pytest.raises(VideoError, match="no decodable frame"):
        read_clip(path, 4, 16)


def test_opencv_errors_become_video_errors(clip50, monkeypatch):
    def broken(self, *args):
        raise cv2.error("simulated decoder failure")

    monkeypatch.setattr(cv2.VideoCapture, "retrieve", broken)
    with pytest.raises(VideoError, match="simulated decoder failure") as info:
        read_clip(clip50, 4, 16, decoder="opencv")
    assert str(clip50) in str(info.value)


def test_frame_that_grabs_but_cannot_be_retrieved_is_a_video_error(clip50, monkeypatch):
    monkeypatch.setattr(cv2.VideoCapture, "retrieve", lambda self, *args: (False, None))
    with pytest.raises(VideoError, match="could not be decoded") as info:
        read_clip(clip50, 4, 16, decoder="opencv")
    assert str(clip50) in str(info.value)


# --------------------------------------------------------------------- odd but valid inputs


@pytest.mark.parametrize(
    ("writer", "name", "n_frames", "decoded_size"),
    [
        (write_1x1, "one_pixel.avi", 5, (1, 1)),
        (write_wide, "wide.mp4", 6, (400, 8)),
        (write_gray, "gray.mp4", 6, (64, 64)),
        (write_odd_size, "odd.mp4", 6, (96, 60)),  # OpenCV's writer stores 97x61 as 96x60
    ],
)
@pytest.mark.parametrize("size", [4, 48])
def test_odd_but_valid_videos_decode(tmp_path, writer, name, n_frames, decoded_size, size):
    path = writer(tmp_path / name)
    clip = read_clip(path, 8, size)
    assert clip.frames.shape == (8, size, size, 3)
    assert clip.n_frames == n_frames
    assert clip.mask.sum() == n_frames
    assert (clip.width, clip.height) == decoded_size


def test_gray_video_decodes_to_gray_rgb_frames(tmp_path):
    clip = read_clip(write_gray(tmp_path / "gray.mp4"), 6, 32)
    spread = np.abs(clip.frames.astype(int) - clip.frames.mean(axis=3, keepdims=True)).max()
    assert spread <= 3
    assert _decoded_indices(clip) == list(range(6))


@pytest.mark.parametrize(
    "relative",
    [
        "folder with spaces/my clip.mp4",
        "ünïcödé/vidéo 日本語 ✓.mp4",
        "percent/clip%03d 100%.mp4",
    ],
)
def test_names_with_spaces_non_ascii_and_percent_signs(tmp_path, relative):
    path = tmp_path / relative
    path.parent.mkdir(parents=True)
    write_video(path, 12, 64, 64)
    clip = read_clip(path, 4, 16)
    assert clip.n_frames == 12
    assert _decoded_indices(clip) == sample_indices(12, 4).tolist()
    assert count_frames(path) == 12
    missing = path.with_name("absent " + path.name)
    with pytest.raises(VideoError) as info:
        read_clip(missing, 4, 16)
    assert str(missing) in str(info.value)


# ---------------------------------------------------------------------------- real clips

# Verified by decoding every frame (they agree with SOURCES.md).
REAL_CLIPS = {
    "v_Basketball_g01_c01.avi": {"frames": 141, "fps": 29.97, "size": (320, 240), "codec": "FMP4"},
    "abseiling_k400.mp4": {"frames": 250, "fps": 25.0, "size": (454, 256), "codec": "h264"},
    "v_GGSY1Qvo990.mp4": {"frames": 355, "fps": 19.62, "size": (320, 240), "codec": "h264"},
    "v_ZNVhz7ctTq0.mp4": {"frames": 420, "fps": 30.0, "size": (480, 360), "codec": "h264"},
}


def _fourcc(path: Path) -> str:
    cap = cv2.VideoCapture(str(path))
    try:
        code = int(cap.get(cv2.CAP_PROP_FOURCC))
    finally:
        cap.release()
    return "".join(chr((code >> 8 * i) & 0xFF) for i in range(4))


@pytest.mark.parametrize("name", sorted(REAL_CLIPS))
def test_real_clip_decodes_with_verified_frame_count_and_fps(real_fixtures, name):
    expected = REAL_CLIPS[name]
    path = real_fixtures / name
    assert _fourcc(path) == expected["codec"]
    clip = read_clip(path, 8, 64)
    assert clip.n_frames == expected["frames"]
    assert clip.fps == pytest.approx(expected["fps"], abs=0.01)
    assert (clip.width, clip.height) == expected["size"]
    assert clip.frames.shape == (8, 64, 64, 3) and clip.mask.all()
    assert clip.indices.tolist() == sample_indices(expected["frames"], 8).tolist()
    # Real content: every kept frame has structure, and the clip changes over time.
    assert all(frame.std() > 5 for frame in clip.frames)
    assert np.abs(clip.frames[0].astype(int) - clip.frames[-1].astype(int)).mean() > 1


def test_real_clips_cover_mpeg4_part2_and_h264(real_fixtures):
    codecs = {_fourcc(real_fixtures / name) for name in REAL_CLIPS}
    assert {"FMP4", "h264"} <= codecs


def test_real_clip_count_frames_and_missing_count_fallback(real_fixtures, monkeypatch):
    path = real_fixtures / "v_Basketball_g01_c01.avi"
    assert count_frames(path) == 141
    truth = read_clip(path, 8, 32, "first", decoder="opencv")
    _fake_frame_count(monkeypatch, 0)
    _assert_same_clip(read_clip(path, 8, 32, "first", decoder="opencv"), truth)


# ------------------------------------------------------------------------- permissions
# We may run as root, where chmod does not deny reads; a fault-injection wrapper around os.open
# denies them for one path instead, the way the kernel does for a file without read permission.


def deny_reading(monkeypatch, denied: Path) -> None:
    import os

    real_open = os.open

    def fake_open(path, flags, *args, **kwargs):
        if Path(os.fsdecode(path)) == denied:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)


@pytest.mark.parametrize(
    "read", [lambda p: read_clip(p, 8, 32, decoder="opencv"), count_frames], ids=["read_clip", "count_frames"]
)
def test_a_file_without_read_permission_is_not_called_not_a_video(clip50, monkeypatch, read):
    deny_reading(monkeypatch, Path(clip50))
    with pytest.raises(VideoError) as info:
        read(clip50)
    message = str(info.value)
    assert str(clip50) in message and "permission denied" in message
    assert "not a video file" not in message and "cannot open" not in message


def test_a_file_in_a_folder_that_cannot_be_entered_is_a_clip_error_not_a_crash(clip50, monkeypatch):
    """A folder with read but not execute permission: its files are listed, but even stat is refused."""
    real_stat = Path.stat

    def stat(self, *args, **kwargs):
        if self == Path(clip50):
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    with pytest.raises(VideoError) as info:
        read_clip(clip50, 8, 32, decoder="opencv")
    assert str(clip50) in str(info.value) and "permission denied" in str(info.value)
