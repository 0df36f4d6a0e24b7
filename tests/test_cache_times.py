"""Frame times in the cache (schema version 4): each kept frame's time, the clip's duration and fps.

Extraction (both engines' code paths) stores what the decoder returned; the journal, resume, the one-file
and part-file layouts, merge, compact and verify carry them; caches of version 1 to 3 and journals from
before frame times read as NaN ("not recorded"), and `featpipe info` says which it is.
"""

from __future__ import annotations

from dataclasses import replace

import h5py
import numpy as np
import pytest

import featpipe
from cache_helpers import CONFIG, KEYS, T, clip, downgrade_to_version_3
from cli_args import cli
from featpipe.cache.journal import iter_journal
from featpipe.cache.reader import RowReader, frame_times, open_h5, summarize
from featpipe.cache.schema import SCHEMA_VERSION, journal_path
from featpipe.cache.shards import compact_cache, merge_shards, shard_of, shard_path
from featpipe.cache.writer import CacheWriter
from featpipe.errors import CacheError, DamagedCacheError
from featpipe.extraction.extract import extract
from featpipe.video.decode import read_clip
from videos import write_video

pytestmark = pytest.mark.usefixtures("default_threshold")

LAYOUTS = ["one file", "part files"]


@pytest.fixture
def layout(request, monkeypatch):
    if request.param == "part files":
        monkeypatch.setenv("FEATPIPE_ONE_FILE_MB", "0")
    return request.param


def timed(i: int, key: str | None = None):
    """clip(i) (3 real frames of T) with frame times: 0.5 s apart from i/10 s, 12.5 fps, i + 2 s long."""
    rec = clip(i, key)
    times = np.full(T, np.nan, np.float32)
    times[rec.mask] = i / 10 + 0.5 * np.arange(rec.mask.sum())
    return replace(rec, times=times, duration=float(i + 2), fps=12.5)


def timing(path) -> dict:
    """Clip key -> (time row, duration, fps) as stored, read with plain h5py."""
    with h5py.File(path, "r") as f:
        keys = list(f["video"].asstr()[:])
        return {k: (f["time"][i], float(f["duration"][i]), float(f["fps"][i])) for i, k in enumerate(keys)}


def assert_timed(got, i: int) -> None:
    want = timed(i)
    np.testing.assert_array_equal(got[0], want.times)  # NaN on padding, in the same places
    assert (got[1], got[2]) == (want.duration, want.fps)


def assert_not_recorded(got) -> None:
    assert np.isnan(got[0]).all() and np.isnan(got[1]) and np.isnan(got[2])


# ----------------------------------------------------------------------------- extraction


def test_extract_stores_each_kept_frames_time_and_the_clips_duration_and_fps(tmp_path):
    data = tmp_path / "data"
    write_video(data / "grow" / "short.mp4", 3, 32, 32, fps=10)  # fewer frames than --frames: padding
    write_video(data / "grow" / "long.mp4", 10, 32, 32, fps=10)
    write_video(data / "shrink" / "fast.mp4", 10, 32, 32, fps=25)
    out = tmp_path / "c.h5"
    extract(data=data, output=out, backbone="raw", size=16, frames=4, quiet=True)
    got = timing(out)
    for key in ("grow/short.mp4", "grow/long.mp4", "shrink/fast.mp4"):
        decoded = read_clip(data / key, 4, 16)
        time, duration, fps = got[key]
        real = ~np.isnan(time)
        assert real.sum() == decoded.mask.sum() == min(4, 3 if "short" in key else 10), key
        np.testing.assert_array_equal(time[real], decoded.times.astype(np.float32))
        assert duration == np.float32(decoded.duration) and fps == np.float32(decoded.fps)
    # what the decoder reports, checked against the files written: uniform sampling of 10 frames at 10 fps
    np.testing.assert_allclose(got["grow/long.mp4"][0], [0.0, 0.3, 0.6, 0.9], atol=1e-6)
    np.testing.assert_allclose(got["grow/short.mp4"][0][:3], [0.0, 0.1, 0.2], atol=1e-6)
    assert np.isnan(got["grow/short.mp4"][0][3]), "NaN on padding"
    assert got["grow/long.mp4"][1:] == pytest.approx((1.0, 10.0)) and got["shrink/fast.mp4"][1:] == pytest.approx(
        (0.4, 25.0)
    )
    times = frame_times(out)  # the Python API
    np.testing.assert_allclose(times["grow/short.mp4"].times, [0.0, 0.1, 0.2], atol=1e-6)
    assert times["shrink/fast.mp4"].fps == 25.0 and times["shrink/fast.mp4"].recorded
    shown = "\n".join(featpipe.info(out))
    assert "clips 0.3 / 0.4 / 1.0 s long (min / median / max), 10 to 25 fps; frame times: recorded" in shown


@pytest.mark.parametrize("decoder", ["auto", "opencv"])
def test_extract_by_time_on_a_10_s_clip_stores_20_frame_times_half_a_second_apart(tmp_path, decoder):
    data = tmp_path / "data"
    write_video(data / "grow" / "ten seconds.mp4", 100, 32, 32, fps=10)
    write_video(data / "shrink" / "one second.mp4", 10, 32, 32, fps=10)  # 2 frames at 2 fps, then padding
    out = tmp_path / "c.h5"
    extract(data=data, output=out, backbone="raw", size=16, frames=20, fps=2, decoder=decoder, quiet=True)
    got = timing(out)
    np.testing.assert_allclose(got["grow/ten seconds.mp4"][0], np.arange(20) * 0.5, atol=1e-5)
    assert got["grow/ten seconds.mp4"][1:] == pytest.approx((10.0, 10.0))
    np.testing.assert_allclose(got["shrink/one second.mp4"][0][:2], [0.0, 0.5], atol=1e-5)
    assert np.isnan(got["shrink/one second.mp4"][0][2:]).all()


def test_the_ray_engines_decode_embed_and_driver_steps_carry_the_frame_times(tmp_path):
    """The ray engine's UDFs and driver loop, run here without Ray (a batch handed from one to the next)."""
    from featpipe.extraction.engines.ray import ClipEmbedder, consume, decode_batch
    from featpipe.extraction.stages import Stats

    path = write_video(tmp_path / "a.mp4", 10, 32, 32, fps=10)
    batch = {"key": np.array(["a.mp4"]), "path": np.array([str(path)]), "label": np.array([0]), "split": ["train"]}
    rows = ClipEmbedder("raw", 16, "none", 0, None, "float32", "uint8")(decode_batch(batch, 4, 16, "uniform"))

    class Rows:
        def iter_batches(self, **_):
            yield rows

    class Sink(list):
        put = list.append

    sink = Sink()
    consume(Rows(), sink, np.uint8, rows["fingerprint"][0], rows["keras_version"][0], Stats())
    (rec,) = sink
    decoded = read_clip(path, 4, 16)
    np.testing.assert_array_equal(rec.times, decoded.times.astype(np.float32))
    assert (rec.duration, rec.fps) == (decoded.duration, 10.0)


# ----------------------------------------------------------------------------- the writer


@pytest.mark.parametrize("layout", LAYOUTS, indirect=True)
def test_a_run_resumed_from_its_journal_and_clips_added_later_keep_every_rows_frame_times(tmp_path, layout):
    path = tmp_path / "c.h5"
    killed = CacheWriter(path, CONFIG)
    for i in (0, 1):
        killed.append(timed(i))
    killed.close()  # no finalize: as a killed run leaves it, the clips only in the journal
    resumed = CacheWriter(path, CONFIG)
    assert resumed.done == {clip(0).video, clip(1).video}
    resumed.append(timed(2))
    resumed.finalize()
    got = timing(path)
    for i in range(3):
        assert_timed(got[clip(i).video], i)
    later = CacheWriter(path, CONFIG)  # the old rows are copied (one file) or kept in their parts
    later.append(timed(3))
    later.finalize()
    got = timing(path)
    for i in range(4):
        assert_timed(got[clip(i).video], i)
    with open_h5(path) as f:
        assert bool("parts" in f) == (layout == "part files")
        row = RowReader(f)(list(f["video"].asstr()[:]).index(clip(1).video))
    np.testing.assert_array_equal(row.times, timed(1).times)
    assert (row.duration, row.fps) == (3.0, 12.5)


def test_a_journal_written_before_frame_times_resumes_with_those_rows_not_recorded(tmp_path):
    path = tmp_path / "c.h5"
    old = CacheWriter(path, CONFIG)
    old.append(clip(0))  # no times: its journal record is what a featpipe from before frame times wrote
    old.close()
    (header,) = iter_journal(journal_path(path))
    assert not {"times", "duration", "fps"} & set(header)
    new = CacheWriter(path, CONFIG)
    new.append(timed(1))
    new.finalize()
    got = timing(path)
    assert_not_recorded(got[clip(0).video])
    assert_timed(got[clip(1).video], 1)
    line = summarize(path).timing_line()
    assert "frame times: recorded for 1 of 2 clips (the rest written by an older featpipe)" in line


@pytest.mark.parametrize("layout", LAYOUTS, indirect=True)
def test_a_version_3_cache_reads_says_not_recorded_and_grows_into_version_4(tmp_path, layout):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, CONFIG)
    for i in (0, 1):
        w.append(timed(i))
    w.finalize()
    downgrade_to_version_3(path)
    result = cli("info", path)
    assert result.exit_code == 0, result.output
    assert "frame times: not recorded (written by an older featpipe)" in result.output
    times = frame_times(path)
    assert not times[clip(0).video].recorded and np.isnan(times[clip(0).video].times).all()
    assert len(times[clip(0).video].times) == 3, "one (NaN) time per real frame"
    with open_h5(path) as f:
        row = RowReader(f)(0)
    assert np.isnan(row.times).all() and row.times.shape == (T,) and np.isnan(row.duration)
    w = CacheWriter(path, CONFIG)  # appending: the cache is rewritten as version 4, its old rows not recorded
    w.append(timed(2))
    w.finalize()
    with h5py.File(path, "r") as f:
        assert f.attrs["schema_version"] == SCHEMA_VERSION == 4
    got = timing(path)
    assert_not_recorded(got[clip(0).video])
    assert_not_recorded(got[clip(1).video])
    assert_timed(got[clip(2).video], 2)
    assert "recorded for 1 of 3 clips" in "\n".join(featpipe.info(path, verify=True))


# ----------------------------------------------------------------------------- merge, compact, verify


@pytest.mark.parametrize("how", ["one file", "part files", "compact"])
def test_merge_and_compact_keep_frame_times_and_a_version_3_shards_rows_are_not_recorded(how, tmp_path, monkeypatch):
    if how == "part files":
        monkeypatch.setenv("FEATPIPE_ONE_FILE_MB", "0")
    out = tmp_path / "c.h5"
    keys = KEYS[:8]
    for s in (1, 2):
        w = CacheWriter(shard_path(out, s, 2), replace(CONFIG, extra={"shard": f"{s}/2"}))
        for i, key in enumerate(keys):
            if shard_of(key, 2) == s:
                w.append(timed(i, key))
        w.finalize()
    merge_shards(output=out, compact=how == "compact")
    got = timing(out)
    assert sorted(got) == sorted(keys)
    for i, key in enumerate(keys):
        assert_timed(got[key], i)
    compact_cache(out, tmp_path / "compacted.h5")
    assert {k: v[1:] for k, v in timing(tmp_path / "compacted.h5").items()} == {k: v[1:] for k, v in got.items()}
    for key, (time, _, _) in timing(tmp_path / "compacted.h5").items():
        np.testing.assert_array_equal(time, got[key][0])
    downgrade_to_version_3(shard_path(out, 2, 2))
    merge_shards(output=out, force=True, compact=how == "compact")
    got = timing(out)
    for i, key in enumerate(keys):
        if shard_of(key, 2) == 1:
            assert_timed(got[key], i)
        else:
            assert_not_recorded(got[key])


def test_verify_names_a_clip_whose_frame_times_do_not_fit_its_mask(tmp_path):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, CONFIG)
    for i in range(3):
        w.append(timed(i))
    w.finalize()
    assert featpipe.info(path, verify=True)[-1].startswith("  all 3 rows verified")
    with h5py.File(path, "a") as f:
        f["time"][1, T - 1] = 9.0  # a time on padding
    with pytest.raises(DamagedCacheError, match=r"frame times of clip 'train/a/clip1\.mp4'.*do not match"):
        featpipe.info(path, verify=True)


def test_a_version_4_cache_that_lost_its_time_columns_is_refused_as_incomplete(tmp_path):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, CONFIG)
    w.append(timed(0))
    w.finalize()
    with h5py.File(path, "a") as f:
        del f["time"], f["duration"], f["fps"]
    with pytest.raises(CacheError, match="incomplete featpipe cache: it lacks time, duration, fps"):
        featpipe.info(path)
