"""`featpipe predict`, the Python API and `featpipe info` on runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

import featpipe
from featpipe.cli import app
from featpipe.errors import BackboneError, FeatpipeError
from featpipe.runs.predict import Predictor, expand_clips
from featpipe.video.decode import window_indices
from videos import write_text_as_video, write_video

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """sample data -> extract -> train through the public Python API."""
    root = tmp_path_factory.mktemp("predict")
    from featpipe.video.sample_data import write_sample_data

    write_sample_data(root / "data", train=3, val=1, test=2, seed=0)
    ex = featpipe.extract(
        data=root / "data",
        output=root / "cache" / "vgg16.h5",
        backbone="vgg16",
        size=32,
        frames=8,
        weights="none",
        quiet=True,
    )
    tr = featpipe.train(cache=ex.cache, rnn="gru", models_dir=root / "models", epochs=4, patience=4, quiet=True)
    return root, ex, tr


def test_predicting_the_test_clips_agrees_with_evaluate_on_the_cache(run):
    """Same preprocessing end to end: decode -> sample -> crop -> backbone -> head."""
    root, ex, tr = run
    metrics = featpipe.evaluate(tr.run_dir, split="test")
    with h5py.File(ex.cache, "r") as f:
        test = [i for i, s in enumerate(f["split"].asstr()[:]) if s == "test"]
        videos = [f["video"].asstr()[i] for i in test]
        labels = [int(f["label"][i]) for i in test]
    preds = featpipe.predict([root / "data" / v for v in videos], model=tr.run_dir, top_k=1)
    names = metrics["class_names"]
    predicted = [names.index(p.top[0][0]) for p in preds]
    cm = np.zeros((len(names), len(names)), int)
    for t, p in zip(labels, predicted):
        cm[t, p] += 1
    assert cm.tolist() == metrics["confusion_matrix"]


def test_results_have_top_k_labels_with_probabilities_in_order(run):
    root, ex, tr = run
    [p] = featpipe.predict([root / "data" / "test" / "grow" / "grow_test_000.mp4"], model=tr.run_dir, top_k=3)
    assert p.ok and len(p.top) == 3
    probs = [prob for _, prob in p.top]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6
    assert abs(p.probabilities.sum() - 1) < 1e-5
    assert {lab for lab, _ in p.top} <= set(tr.metrics["test"]["class_names"])


def test_folders_expand_to_their_videos_and_a_bad_clip_does_not_stop_the_others(run, tmp_path):
    root, ex, tr = run
    write_text_as_video(tmp_path / "broken.mp4")
    preds = featpipe.predict(
        [root / "data" / "test" / "shrink", tmp_path / "broken.mp4", tmp_path / "missing.mp4"], model=tr.run_dir
    )
    assert [Path(p.clip).name for p in preds] == [
        "shrink_test_000.mp4",
        "shrink_test_001.mp4",
        "broken.mp4",
        "missing.mp4",
    ]
    assert preds[0].ok and preds[1].ok
    assert "broken.mp4" in preds[2].error and "not found" in preds[3].error


def test_cli_json_lines_csv_and_exit_status(run, tmp_path):
    root, ex, tr = run
    write_text_as_video(tmp_path / "broken.mp4")
    out_csv = tmp_path / "p.csv"
    result = runner.invoke(
        app,
        [
            "predict",
            str(root / "data" / "test" / "grow"),
            str(tmp_path / "broken.mp4"),
            "--model",
            str(tr.run_dir),
            "--json",
            "--top-k",
            "2",
            "--output",
            str(out_csv),
        ],
    )
    assert result.exit_code == 1, "a failed clip makes the exit status 1"
    assert f"Found 2 clips in '{root / 'data' / 'test' / 'grow'}'." in result.stderr  # stdout: JSON only
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 3
    assert set(lines[0]) == {"clip", "top", "duration"} and len(lines[0]["top"]) == 2
    from featpipe.video.decode import read_clip

    assert lines[0]["duration"] == pytest.approx(read_clip(lines[0]["clip"], 1, 8).duration, abs=1e-5)
    assert 0 < lines[0]["duration"] < 10
    assert set(lines[0]["top"][0]) == {"label", "probability"}
    assert lines[2]["clip"].endswith("broken.mp4") and "error" in lines[2]
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 3 and rows[0]["label_1"] and rows[2]["error"]
    assert "Traceback" not in result.stderr


def test_cli_table_and_success_exit_status(run):
    root, ex, tr = run
    result = runner.invoke(
        app, ["predict", str(root / "data" / "test" / "grow" / "grow_test_000.mp4"), "--model", str(tr.run_dir)]
    )
    assert result.exit_code == 0
    assert "grow_test_000.mp4" in result.output and "%" in result.output


def test_models_latest_is_the_default(run, monkeypatch):
    root, ex, tr = run
    monkeypatch.chdir(root)
    result = runner.invoke(app, ["predict", "data/test/grow/grow_test_000.mp4"])
    assert result.exit_code == 0, result.stderr


def test_windows_average_over_evenly_spaced_parts_of_a_long_clip(run, tmp_path):
    root, ex, tr = run
    assert [w.tolist() for w in window_indices(40, 4, "uniform", 2)] == [[0, 6, 13, 19], [20, 26, 33, 39]]
    assert len(window_indices(3, 4, "uniform", 5)) == 3
    clip = write_video(tmp_path / "long.mp4", 90, 64, 48)
    [three] = featpipe.predict([clip], model=tr.run_dir, windows=3)
    [one] = featpipe.predict([clip], model=tr.run_dir, windows=1)
    assert three.windows == 3 and one.windows == 1
    assert not np.allclose(three.probabilities, one.probabilities)


def test_gif_of_one_clip_is_written_and_refused_for_several(run, tmp_path):
    root, ex, tr = run
    clip = root / "data" / "test" / "grow" / "grow_test_000.mp4"
    gif = tmp_path / "grow.gif"
    featpipe.predict([clip], model=tr.run_dir, gif=gif)
    assert gif.read_bytes()[:6] in (b"GIF89a", b"GIF87a")
    from PIL import Image

    with Image.open(gif) as im:
        assert im.n_frames == 8
    with pytest.raises(FeatpipeError, match="one clip"):
        featpipe.predict([clip, clip], model=tr.run_dir, gif=gif)


def test_a_weights_fingerprint_mismatch_is_one_sentence(run, tmp_path):
    root, ex, tr = run
    info = json.loads((tr.run_dir / "run.json").read_text())
    info["preprocessing"]["weights_seed"] = 99  # a different random network than the one trained on
    bad = tmp_path / "run"
    bad.mkdir()
    (bad / "run.json").write_text(json.dumps(info))
    (bad / "model.keras").write_bytes((tr.run_dir / "model.keras").read_bytes())
    with pytest.raises(BackboneError, match="not the ones the run was trained with"):
        Predictor(bad)


def test_a_missing_local_weights_file_is_one_sentence(run, tmp_path):
    root, ex, tr = run
    info = json.loads((tr.run_dir / "run.json").read_text())
    info["preprocessing"]["weights"] = str(tmp_path / "gone.h5")
    bad = tmp_path / "run"
    bad.mkdir()
    (bad / "run.json").write_text(json.dumps(info))
    (bad / "model.keras").write_bytes((tr.run_dir / "model.keras").read_bytes())
    result = runner.invoke(app, ["predict", str(root / "data" / "test" / "grow"), "--model", str(bad)])
    assert result.exit_code == 2 and "gone.h5" in result.stderr and "Traceback" not in result.stderr


def test_bad_arguments_are_exit_2(run, tmp_path):
    root, ex, tr = run
    clip = str(root / "data" / "test" / "grow" / "grow_test_000.mp4")
    assert runner.invoke(app, ["predict", clip, "--model", str(tr.run_dir), "--top-k", "0"]).exit_code == 2
    assert runner.invoke(app, ["predict", clip, "--model", str(tmp_path)]).exit_code == 2
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["predict", str(tmp_path / "empty"), "--model", str(tr.run_dir)])
    assert result.exit_code == 2 and "no video files" in result.stderr
    with pytest.raises(FeatpipeError):
        expand_clips([])


def test_info_describes_a_run_and_a_cache(run):
    root, ex, tr = run
    run_out = runner.invoke(app, ["info", str(root / "models" / "latest")])
    assert run_out.exit_code == 0
    for word in ("head gru", "blue_to_red", "backbone vgg16", "8 frames", "test: accuracy"):
        assert word in run_out.output
    cache_out = runner.invoke(app, ["info", str(ex.cache)])
    assert cache_out.exit_code == 0 and "24 clips" in cache_out.output


def test_the_python_api_mirrors_the_commands():
    import inspect

    assert inspect.signature(featpipe.predict).parameters["top_k"].default == 3
    assert inspect.signature(featpipe.evaluate).parameters["split"].default == "test"
    assert featpipe.ExtractOptions().frames == 20 and featpipe.ExtractOptions().backbone == "inceptionv3"
    assert featpipe.TrainOptions().head == "gru"
    for fn in (
        featpipe.extract,
        featpipe.train,
        featpipe.evaluate,
        featpipe.predict,
        featpipe.info,
    ):
        assert "Return" in fn.__doc__ or "return" in fn.__doc__.lower()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "-1"], "--batch-size must be between 1 and"),  # once: every clip got the same answer
        (["--batch-size", "0"], "--batch-size must be between 1 and"),  # once: silently the default
        (["--batch-size", "100000000"], "--batch-size must be between 1 and"),
        (["--workers", "-1"], "--workers must be between 1 and"),
        (["--workers", "0"], "--workers must be between 1 and"),
        (["--top-k", "0"], "--top-k must be between 1 and"),
        (["--windows", "0"], "--windows must be between 1 and"),
        (["--windows", "1000000"], "--windows must be between 1 and"),
    ],
)
def test_bad_options_are_one_sentence_naming_the_flag(run, args, message):
    root, ex, tr = run
    clip = str(root / "data" / "test" / "grow" / "grow_test_000.mp4")
    result = runner.invoke(app, ["predict", clip, "--model", str(tr.run_dir), *args])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1, result.stderr


def test_the_old_clips_flag_is_windows_with_a_deprecation_note(run):
    root, ex, tr = run
    clip = str(root / "data" / "test" / "grow" / "grow_test_000.mp4")
    result = runner.invoke(app, ["predict", clip, "--model", str(tr.run_dir), "--clips", "0"])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines()[0] == "note: --clips is deprecated for predict; use --windows"
    assert result.stderr.splitlines()[1].startswith("error: --windows must be between 1 and")
    assert "--clips" not in runner.invoke(app, ["predict", "--help"]).output


def test_the_api_names_parameters_and_refuses_before_loading_the_run(tmp_path):
    from featpipe.errors import OptionError
    from featpipe.runs.predict import PredictOptions

    with pytest.raises(OptionError, match=r"^batch_size must be between 1 and"):
        featpipe.predict([tmp_path / "x.mp4"], model=tmp_path / "no-run", batch_size=-1)
    with pytest.raises(OptionError, match=r"^windows must be"):
        PredictOptions(windows=0)
    with pytest.raises(OptionError, match=r"^workers must be"):
        PredictOptions(workers=-1)


def test_output_naming_a_folder_is_refused_before_predicting(run, tmp_path):
    root, ex, tr = run
    clip = str(root / "data" / "test" / "grow" / "grow_test_000.mp4")
    (tmp_path / "out").mkdir()
    result = runner.invoke(app, ["predict", clip, "--model", str(tr.run_dir), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2 and "--output must be a file" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == "", "refused before any clip was classified"
    assert list(tmp_path.iterdir()) == [tmp_path / "out"] and list((tmp_path / "out").iterdir()) == []


def test_info_says_whether_the_run_cache_changed_since_training(run, tmp_path):
    import shutil

    root, ex, tr = run
    out = runner.invoke(app, ["info", str(tr.run_dir)])
    assert out.exit_code == 0 and "unchanged since training" in out.output
    assert "train clips" in out.output and "validation clips" in out.output
    moved = tmp_path / "run"
    shutil.copytree(tr.run_dir, moved)
    data = json.loads((moved / "run.json").read_text())
    data["cache_fingerprint"] = "0" * 16  # as if the cache had been re-extracted since
    (moved / "run.json").write_text(json.dumps(data))
    out = runner.invoke(app, ["info", str(moved)])
    assert out.exit_code == 0 and "CHANGED since training" in out.output


# ------------------------------------------------------------------------- what the API and DIR take


def test_the_api_takes_one_path_as_one_clip_never_its_letters(run, monkeypatch):
    """A str was iterated letter by letter: '.' (here, a folder of clips) and '/' expanded to whole folders."""
    root, ex, tr = run
    folder = root / "data" / "test" / "grow"
    monkeypatch.chdir(folder)
    loaded = Predictor(tr.run_dir)  # built once for the three calls
    for clip in ("grow_test_000.mp4", Path("grow_test_000.mp4")):
        [p] = featpipe.predict(clip, model=tr.run_dir, predictor=loaded)
        assert p.ok and p.clip == "grow_test_000.mp4"
    assert [Path(p.clip).name for p in featpipe.predict(str(folder), model=tr.run_dir, predictor=loaded)] == [
        "grow_test_000.mp4",
        "grow_test_001.mp4",
    ]
    with pytest.raises(featpipe.errors.OptionError, match="^clips holds an empty path"):
        featpipe.predict("", model=tr.run_dir)


def test_predict_dir_finds_the_clips_extract_indexes_in_it(tmp_path):
    """One rule for both: recursive, hidden entries skipped, symlinked folders followed, a link loop cut."""
    from featpipe.video.datasets import index_dataset

    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    for rel in ("cats/a.mp4", "cats/sub/b.MP4", "cats/.hidden.mp4", "cats/.cache/c.mp4", "cats/notes.txt"):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(b"")
    for rel in ("dogs/d.mp4", "more/e.avi"):
        (elsewhere / rel).parent.mkdir(parents=True, exist_ok=True)
        (elsewhere / rel).write_bytes(b"")
    (data / "dogs").symlink_to(elsewhere / "dogs")  # a linked class folder
    (data / "cats" / "linked").symlink_to(elsewhere / "more")  # a linked folder inside one
    (data / "cats" / "sub" / "loop").symlink_to(data / "cats")  # a loop
    indexed = {r.video for r in index_dataset(data).records}
    assert indexed == {"cats/a.mp4", "cats/sub/b.MP4", "cats/linked/e.avi", "dogs/d.mp4"}
    assert {p.relative_to(data).as_posix() for p in expand_clips([data])} == indexed


def test_a_folder_that_cannot_be_read_is_a_result_of_its_own(run, tmp_path, monkeypatch):
    """Denied by fault injection here (root reads everything); test_cli runs it as a user meets it."""
    import os
    import shutil

    root, ex, tr = run
    folder = tmp_path / "clips"
    shutil.copytree(root / "data" / "test" / "grow", folder / "grow")
    shutil.copytree(root / "data" / "test" / "shrink", folder / "shrink")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(os.fsdecode(path)) == folder / "shrink":
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    preds = featpipe.predict([folder], model=tr.run_dir)
    assert [p.ok for p in preds] == [True, True, False]
    assert preds[2].clip == str(folder / "shrink")
    assert "permission denied" in preds[2].error and "its clips were not indexed" in preds[2].error
