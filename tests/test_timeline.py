"""Sampling by time end to end (extract --fps -> train -> predict) and `predict --timeline`."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

import featpipe
from featpipe.cli import app
from featpipe.errors import FeatpipeError, OptionError
from featpipe.runs.predict import Predictor
from featpipe.runs.timeline import clock
from featpipe.video.decode import read_clip
from videos import write_av

runner = CliRunner()


@pytest.fixture(scope="module")
def fps_run(tmp_path_factory):
    """sample data -> extract sampling 4 frames per second -> a GRU, and a 10-minute clip."""
    root = tmp_path_factory.mktemp("timeline")
    from featpipe.video.sample_data import write_sample_data

    write_sample_data(root / "data", train=3, val=1, test=2, seed=0)
    ex = featpipe.extract(
        data=root / "data",
        output=root / "vgg16.h5",
        backbone="vgg16",
        size=32,
        frames=8,
        fps=4.0,
        weights="none",
        quiet=True,
    )
    tr = featpipe.train(cache=ex.cache, rnn="gru", models_dir=root / "models", epochs=3, patience=3, quiet=True)
    # ten minutes at 2 frames per second, a keyframe every 20 frames, lossless so cut copies have equal pixels
    long = write_av(root / "ten_minutes.mkv", "ffv1", n_frames=1200, width=48, height=32, fps=2)
    return root, ex, tr, long


def test_fps_sampling_is_recorded_and_predict_reproduces_it(fps_run):
    root, ex, tr, _ = fps_run
    with h5py.File(ex.cache, "r") as f:
        assert f.attrs["sampling"] == "fps=4"
        test = [i for i, s in enumerate(f["split"].asstr()[:]) if s == "test"]
        videos = [f["video"].asstr()[i] for i in test]
        labels = [int(f["label"][i]) for i in test]
    metrics = featpipe.evaluate(tr.run_dir, split="test")
    preds = featpipe.predict([root / "data" / v for v in videos], model=tr.run_dir, top_k=1)
    names = metrics["class_names"]
    cm = np.zeros((len(names), len(names)), int)
    for t, p in zip(labels, preds):
        cm[t, names.index(p.top[0][0])] += 1
    assert cm.tolist() == metrics["confusion_matrix"]
    durations = [read_clip(root / "data" / v, 1, 8).duration for v in videos]
    assert metrics["video_seconds"] == pytest.approx(sum(durations), abs=1e-2)  # evaluate reports the cache's times
    assert metrics["video_seconds_clips"] == len(videos)
    # the frames predict reads are the ones extract took, by time: the same features as in the cache
    pred = Predictor(tr.run_dir)
    with h5py.File(ex.cache, "r") as f:
        cached = f["features"][test[0]].astype(np.float32)
    [clip] = pred.read(root / "data" / videos[0])
    assert clip.times[1] == pytest.approx(0.25, abs=0.03)  # 4 per second
    np.testing.assert_allclose(pred.features([clip])[0][0], cached, rtol=2e-2, atol=2e-2)
    uniform = read_clip(root / "data" / videos[0], 8, 32)
    assert not np.allclose(pred.features([uniform])[0][0], cached, rtol=2e-2, atol=2e-2)  # the check can fail


def test_a_ten_minute_clip_in_thirty_second_windows(fps_run):
    root, ex, tr, long = fps_run
    [p] = featpipe.predict(long, model=tr.run_dir, timeline=30)
    assert p.ok and p.duration == pytest.approx(600.0)
    assert [w.start for w in p.timeline] == [30.0 * k for k in range(20)]
    assert [w.end for w in p.timeline] == [30.0 * (k + 1) for k in range(20)]
    np.testing.assert_allclose(np.mean([w.probabilities for w in p.timeline], axis=0), p.probabilities, atol=1e-6)
    assert all(len(w.top) == 3 and w.top[0][1] >= w.top[1][1] for w in p.timeline)


def test_each_window_is_classified_like_a_clip_of_its_own(fps_run, tmp_path):
    root, ex, tr, long = fps_run
    [p] = featpipe.predict(long, model=tr.run_dir, timeline=30)
    # window 3 ([90 s, 120 s)) cut out as a clip of its own: the same frames, sampled the same way
    cut = write_av(tmp_path / "cut.mkv", "ffv1", n_frames=60, width=48, height=32, fps=2, first=180)
    [alone] = featpipe.predict(cut, model=tr.run_dir)
    np.testing.assert_allclose(p.timeline[3].probabilities, alone.probabilities, atol=1e-5)


def test_cli_timeline_table_json_csv_and_plot(fps_run, tmp_path):
    root, ex, tr, long = fps_run
    out, png = tmp_path / "t.csv", tmp_path / "t.png"
    args = ["predict", str(long), "--model", str(tr.run_dir), "--timeline", "30"]
    result = runner.invoke(app, [*args, "--json", "--output", str(out), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["start"], r["end"]) for r in rows] == [(30.0 * k, 30.0 * (k + 1)) for k in range(20)]
    assert all(r["clip"] == str(long) and len(r["top"]) == 3 for r in rows)
    with open(out, newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [float(r["start"]) for r in table] == [30.0 * k for k in range(20)]
    assert [r["label_1"] for r in table] == [r["top"][0]["label"] for r in rows]
    from PIL import Image

    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 400 and im.height > 150
    text = runner.invoke(app, args)
    assert text.exit_code == 0
    lines = text.stdout.splitlines()
    assert lines[0].startswith(f"{long}  (20 windows, 10:00)")
    assert lines[1].split()[:3] == ["0:00", "-", "0:30"] and lines[20].split()[:3] == ["9:30", "-", "10:00"]


def test_timeline_of_a_bad_clip_is_a_failed_row_and_the_others_go_on(fps_run, tmp_path):
    root, ex, tr, _ = fps_run
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    good = root / "data" / "test" / "grow" / "grow_test_000.mp4"
    result = runner.invoke(
        app, ["predict", str(bad), str(good), "--model", str(tr.run_dir), "--timeline", "1", "--json"]
    )
    assert result.exit_code == 1
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows[0]["clip"] == str(bad) and "error" in rows[0]
    assert {r["clip"] for r in rows[1:]} == {str(good)} and rows[1]["start"] == 0.0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--timeline", "0"], "--timeline must be"),
        (["--timeline", "10", "--windows", "3"], "--timeline classifies each window"),
        (["--plot", "x.png"], "--plot draws a timeline"),
        (["--decoder", "gpu"], "Invalid value for '--decoder'"),
    ],
)
def test_bad_timeline_options_are_refused(fps_run, args, message):
    root, ex, tr, long = fps_run
    result = runner.invoke(app, ["predict", str(long), "--model", str(tr.run_dir), *args])
    assert result.exit_code == 2 and message in result.stderr, result.stderr


def test_plot_of_several_clips_is_refused(fps_run, tmp_path):
    root, ex, tr, long = fps_run
    with pytest.raises(FeatpipeError, match="one clip"):
        featpipe.predict([long, long], model=tr.run_dir, timeline=30, plot=tmp_path / "p.png")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"fps": 0.0}, "fps"),
        ({"fps": 2.0, "sampling": "first"}, "cannot be combined with --sampling first"),
        ({"decoder": "gpu"}, "decoder"),
    ],
)
def test_extract_refuses_bad_fps_and_decoder(tmp_path, kwargs, message):
    with pytest.raises(OptionError, match=message):
        featpipe.ExtractOptions(data=tmp_path, backbone="vgg16", weights="none", **kwargs)


def test_clock():
    assert [clock(t) for t in (0, 30, 570, 600, 3725, 2.5)] == ["0:00", "0:30", "9:30", "10:00", "1:02:05", "0:02.5"]
