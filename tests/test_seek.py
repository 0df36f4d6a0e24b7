"""The seeking decoder (PyAV) against the sequential reader (OpenCV): the same frames, fewer decoded.

Every comparison is per frame: the same frame count, indices, mask, times and pixels, on clips of
every container/codec featpipe promises (MP4/H.264 with and without B-frames, AVI/MPEG-4 Part 2,
AVI/MJPEG, WebM/VP9, Matroska/H.264, variable frame rate MP4 and Matroska) and on the real fixtures.
Each clip's frames show their own index (``videos.index_frame``), so a wrong frame is seen as such.
"""

from __future__ import annotations

import numpy as np
import pytest

import featpipe.video.seek as seek
from featpipe.errors import VideoError
from featpipe.video.decode import ClipFrames, read_clip, read_timeline, read_windows
from featpipe.video.plan import Plan
from videos import frame_index, write_av, write_truncated, write_video

# Presentation times of two variable frame rate clips: a jump from 10 to 2.5 frames per second
# half way, and a repeating 40/70/100/130 ms rhythm.
VFR_JUMP = [0.1 * i + (0.3 * (i - 40) if i > 40 else 0.0) for i in range(90)]
VFR_RHYTHM = [sum(0.04 + 0.03 * (k % 4) for k in range(i)) for i in range(90)]

CLIPS = {
    "h264.mp4": {"codec": "libx264"},
    "h264_bframes.mp4": {"codec": "libx264", "options": {"bf": "2", "preset": "fast"}},
    "mpeg4.avi": {"codec": "mpeg4"},
    "mjpeg.avi": {"codec": "mjpeg"},
    "vp9.webm": {"codec": "libvpx-vp9"},
    "h264.mkv": {"codec": "libx264"},
    "vfr_jump.mp4": {"codec": "libx264", "times": VFR_JUMP},
    "vfr_rhythm.mkv": {"codec": "libx264", "times": VFR_RHYTHM},
}
REAL = ["v_Basketball_g01_c01.avi", "abseiling_k400.mp4", "v_GGSY1Qvo990.mp4", "v_ZNVhz7ctTq0.mp4"]
PLANS = {
    "uniform": {"frames": 12},
    "first": {"frames": 12, "sampling": "first"},
    "every frame": {"frames": 500},
    "fps 3": {"frames": 30, "fps": 3.0},
}


def _same(a: ClipFrames, b: ClipFrames, exact: bool = True) -> None:
    assert a.n_frames == b.n_frames
    assert a.indices.tolist() == b.indices.tolist()
    assert a.mask.tolist() == b.mask.tolist()
    np.testing.assert_allclose(a.times, b.times, atol=1e-9)
    assert a.duration == pytest.approx(b.duration)
    assert (a.fps, a.width, a.height, a.damaged_from) == (b.fps, b.width, b.height, b.damaged_from)
    for t in range(len(a.mask)):  # frame by frame
        diff = np.abs(a.frames[t].astype(int) - b.frames[t].astype(int))
        assert diff.max() <= (0 if exact else 2), (
            f"frame {t} (clip frame {a.indices[t] if a.mask[t] else 'padding'}) differs"
        )


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("codecs")
    return {name: write_av(folder / name, n_frames=90, **kw) for name, kw in CLIPS.items()}


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("name", list(CLIPS))
def test_seeking_gives_the_sequential_readers_frames(clips, name, plan):
    seeking = read_clip(clips[name], size=48, decoder="pyav", **PLANS[plan])
    sequential = read_clip(clips[name], size=48, decoder="opencv", **PLANS[plan])
    assert seeking.decoder == "pyav" and sequential.decoder == "opencv"  # no silent fallback
    _same(seeking, sequential)
    shown = [frame_index(f) for f in seeking.frames[seeking.mask]]
    assert shown == seeking.indices.tolist()  # and each is the frame its index names


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("name", REAL)
def test_real_clips_give_the_same_frames_with_both_decoders(real_fixtures, name, plan):
    seeking = read_clip(real_fixtures / name, size=64, decoder="pyav", **PLANS[plan])
    sequential = read_clip(real_fixtures / name, size=64, decoder="opencv", **PLANS[plan])
    assert seeking.decoder == "pyav"
    _same(seeking, sequential)


def test_auto_is_the_seeking_decoder(clips):
    assert read_clip(clips["h264.mp4"], 8, 32).decoder == "pyav"


def test_variable_frame_rate_times_are_the_stream_times(clips):
    clip = read_clip(clips["vfr_jump.mp4"], 500, 32)
    assert clip.n_frames == 90
    np.testing.assert_allclose(clip.times, VFR_JUMP, atol=1e-3)
    clip = read_clip(clips["vfr_rhythm.mkv"], 500, 32)
    np.testing.assert_allclose(clip.times, VFR_RHYTHM, atol=1e-3)


def _count_decoded(monkeypatch) -> list[int]:
    decoded = []
    real = seek._Decoder._next

    def counting(self):
        frame = real(self)
        if frame is not None:
            decoded.append(frame.pts)
        return frame

    monkeypatch.setattr(seek._Decoder, "_next", counting)
    return decoded


def test_seeking_decodes_only_the_stretches_before_kept_frames(tmp_path, monkeypatch):
    path = write_av(tmp_path / "long.mp4", "libx264", n_frames=240, width=64, height=64, gop=20)
    decoded = _count_decoded(monkeypatch)
    clip = read_clip(path, 5, 32)  # frames 0, 60, 120, 179, 239: each at most 19 after a keyframe
    assert clip.decoder == "pyav" and clip.indices.tolist() == [0, 60, 120, 179, 239]
    assert len(decoded) <= 5 * 20 < 240


def test_close_frames_are_read_on_without_seeking(tmp_path, monkeypatch):
    path = write_av(tmp_path / "gop.mp4", "libx264", n_frames=60, width=64, height=64, gop=30)
    seeks = []
    real = seek._Decoder.seek
    monkeypatch.setattr(seek._Decoder, "seek", lambda self, pts: (seeks.append(pts), real(self, pts))[1])
    clip = read_clip(path, 6, 32)  # 0, 12, 24 in the first GOP; 35, 47, 59 in the second
    assert clip.indices.tolist() == [0, 12, 24, 35, 47, 59]
    assert len(seeks) == 1  # one seek, to the second keyframe


def test_a_table_that_disagrees_with_the_stream_is_never_trusted(clips, monkeypatch):
    """If the frame times the decoder planned with are wrong, it notices on the frames it decodes and
    reads the clip sequentially: never a frame of the wrong time."""
    real = seek._index_table

    def wrong(stream, path):
        table = real(stream, path)
        return None if table is None else (table[0] * 2, table[1] * 2)  # every frame twice as late

    monkeypatch.setattr(seek, "_index_table", wrong)
    clip = read_clip(clips["h264.mp4"], 12, 48)
    assert clip.decoder == "opencv"
    _same(clip, read_clip(clips["h264.mp4"], 12, 48, decoder="opencv"))


def test_a_seek_that_lands_late_is_retried_earlier_then_given_up(clips, monkeypatch):
    real_seek = seek._Decoder.seek
    monkeypatch.setattr(seek._Decoder, "seek", lambda self, pts: real_seek(self, pts + 10**9))  # past the end
    clip = read_clip(clips["h264.mp4"], 12, 48)
    assert clip.decoder == "opencv"
    _same(clip, read_clip(clips["h264.mp4"], 12, 48, decoder="opencv"))


@pytest.mark.parametrize("suffix", [".avi", ".mkv"])
def test_truncated_clips_are_read_sequentially_with_the_damage_checks(tmp_path, suffix):
    src = write_video(tmp_path / f"full{suffix}", 60, 64, 64)
    path = write_truncated(tmp_path / f"cut{suffix}", src, 0.7)
    clip = read_clip(path, 8, 32)
    reference = read_clip(path, 8, 32, decoder="opencv")
    _same(clip, reference)
    assert clip.n_frames < 60
    assert [frame_index(f) for f in clip.frames[clip.mask]] == clip.indices.tolist()


@pytest.mark.parametrize("decoder", ["auto", "pyav", "opencv"])
def test_unreadable_files_are_video_errors_with_every_decoder(tmp_path, decoder):
    path = tmp_path / "notes.mp4"
    path.write_text("not a video")
    with pytest.raises(VideoError, match="cannot open") as info:
        read_clip(path, 8, 32, decoder=decoder)
    assert str(path) in str(info.value)


def test_unknown_decoder_is_refused():
    with pytest.raises(ValueError, match="decoder must be one of"):
        read_clip("x.mp4", 8, 32, decoder="gpu")


# ------------------------------------------------------------------------------ sampling by time


def test_fps_two_on_a_ten_second_clip_keeps_twenty_frames_half_a_second_apart(tmp_path):
    path = write_av(tmp_path / "ten.mp4", "libx264", n_frames=300, width=64, height=64, fps=30, gop=60)
    for decoder in ("pyav", "opencv"):
        clip = read_clip(path, 20, 32, fps=2.0, decoder=decoder)
        assert clip.mask.all() and clip.duration == pytest.approx(10.0)
        np.testing.assert_allclose(clip.times, np.arange(20) * 0.5, atol=1e-6)
        assert clip.indices.tolist() == list(range(0, 300, 15))


def test_fps_keeps_the_frame_on_screen_on_variable_frame_rate_clips(clips):
    clip = read_clip(clips["vfr_jump.mp4"], 40, 32, fps=2.0)
    times = np.asarray(VFR_JUMP)
    expected = [
        int(np.searchsorted(times, t + 1e-6, side="right") - 1) for t in np.arange(40) * 0.5 if t < times[-1] + 0.4
    ]
    assert clip.indices.tolist() == expected[:40]
    assert all(clip.times[k] <= 0.5 * k + 1e-6 for k in range(len(clip.times)))  # shown at or before its moment
    assert [frame_index(f) for f in clip.frames[clip.mask]] == expected[:40]


def test_fps_on_a_short_clip_pads_after_the_clip_ends(tmp_path):
    path = write_av(tmp_path / "short.mp4", "libx264", n_frames=45, width=64, height=64, fps=15)  # 3 s
    clip = read_clip(path, 20, 32, fps=2.0)
    assert clip.mask.sum() == 6 and not clip.mask[6:].any()
    # at 15 fps no frame starts at 0.5 s: the one on screen then started at 7/15 s
    assert clip.indices.tolist() == [0, 7, 15, 22, 30, 37]
    np.testing.assert_allclose(clip.times, np.array([0, 7, 15, 22, 30, 37]) / 15, atol=1e-6)


# --------------------------------------------------------------------------------- timelines


def test_a_ten_minute_timeline_in_thirty_second_windows_has_twenty_windows():
    times = np.arange(18000) / 30.0  # ten minutes at 30 fps
    windows = Plan(20, seconds=30.0)(times)
    assert len(windows) == 20
    assert [int(w[0]) for w in windows] == [900 * k for k in range(20)]  # each starts at k * 30 s
    assert all(len(w) == 20 and times[w[-1]] < 30.0 * (k + 1) for k, w in enumerate(windows))


def test_timeline_windows_are_sampled_like_whole_clips(tmp_path):
    path = write_av(tmp_path / "long.mp4", "libx264", n_frames=200, width=64, height=64, fps=10, gop=25)  # 20 s
    windows = read_timeline(path, 4, 32, seconds=6.0)
    assert len(windows) == 4  # [0, 6), [6, 12), [12, 18), [18, 20)
    assert [w.indices.tolist() for w in windows] == [
        [0, 20, 39, 59],
        [60, 80, 99, 119],
        [120, 140, 159, 179],
        [180, 186, 193, 199],
    ]
    assert [w.decoder for w in windows] == ["pyav"] * 4
    sequential = read_timeline(path, 4, 32, seconds=6.0, decoder="opencv")
    for a, b in zip(windows, sequential):
        _same(a, b)
    by_time = read_timeline(path, 4, 32, seconds=6.0, fps=1.0)
    assert [w.indices.tolist() for w in by_time][0] == [0, 10, 20, 30]


def test_count_windows_are_unchanged(clips):
    a = read_windows(clips["h264.mp4"], 4, 32, windows=3)
    b = read_windows(clips["h264.mp4"], 4, 32, windows=3, decoder="opencv")
    assert [w.indices.tolist() for w in a] == [[0, 10, 19, 29], [30, 40, 49, 59], [60, 70, 79, 89]]
    for x, y in zip(a, b):
        _same(x, y)


def test_a_rotated_stream_is_read_as_the_sequential_reader_rotates_it(tmp_path):
    import av

    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=15)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.set_display_rotation(90)  # as phones record portrait video
        for i in range(30):
            rgb = np.ascontiguousarray(
                np.roll(np.arange(96, dtype=np.uint8) * 2, i)[None, :, None].repeat(64, 0).repeat(3, 2)
            )
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    clip = read_clip(path, 8, 32)
    reference = read_clip(path, 8, 32, decoder="opencv")
    assert (reference.width, reference.height) == (64, 96)  # OpenCV applies the rotation
    _same(clip, reference)


@pytest.mark.parametrize("frames", [2.5, 0, -3, True])
def test_a_frame_count_that_is_not_a_positive_integer_is_refused_not_rounded(clips, frames):
    with pytest.raises(ValueError, match="frames must be a positive integer"):
        read_clip(clips["h264.mp4"], frames, 32)
