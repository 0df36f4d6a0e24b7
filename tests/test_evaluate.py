"""`featpipe evaluate`: metrics of a run, JSON output, and refusal of caches made differently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from featpipe.cli import app
from featpipe.errors import CacheError, FeatpipeError
from featpipe.extraction.extract import extract
from featpipe.runs.evaluate import evaluate
from featpipe.training.train import train
from featpipe.video.sample_data import write_sample_data

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    write_sample_data(root / "data", train=3, val=1, test=1, seed=0)
    cache = root / "cache" / "vgg16.h5"
    extract(data=root / "data", output=cache, backbone="vgg16", size=32, frames=8, weights="none", quiet=True)
    # refit=False: val stays held out, so `evaluate --split val` is allowed (a refit run refuses it, tested below)
    result = train(cache=cache, rnn="gru", models_dir=root / "models", epochs=3, patience=3, quiet=True, refit=False)
    return root, cache, result


def test_evaluate_reproduces_the_test_metrics_written_at_training_time(trained):
    root, cache, result = trained
    metrics = evaluate(root / "models" / "latest", split="test")
    report = json.loads((result.run_dir / "report.json").read_text())["test"]
    assert metrics["accuracy"] == pytest.approx(report["accuracy"])
    assert metrics["confusion_matrix"] == report["confusion_matrix"]
    assert metrics["n"] == 4 and metrics["split"] == "test"
    assert sum(map(sum, metrics["confusion_matrix"])) == 4


def test_json_output_is_one_object_with_the_documented_keys(trained, monkeypatch):
    root, cache, result = trained
    out = runner.invoke(app, ["evaluate", str(result.run_dir), "--split", "val", "--json"])
    assert out.exit_code == 0, out.stderr
    data = json.loads(out.output)
    for key in (
        "accuracy",
        "macro_f1",
        "confusion_matrix",
        "class_names",
        "n",
        "split",
        "roc_auc",
        "top_k_accuracy",
        "weighted_f1",
        "per_class",
    ):
        assert key in data
    assert data["split"] == "val" and data["class_names"] == ["blue_to_red", "grow", "red_to_blue", "shrink"]


def test_table_output_shows_per_class_scores_and_the_confusion_matrix(trained):
    root, cache, result = trained
    out = runner.invoke(app, ["evaluate", str(result.run_dir)])
    assert out.exit_code == 0
    for word in ("accuracy", "precision", "recall", "macro", "Confusion matrix", "shrink"):
        assert word in out.output


def test_models_latest_is_the_default_run(trained, monkeypatch):
    root, cache, result = trained
    monkeypatch.chdir(root)
    out = runner.invoke(app, ["evaluate", "--json"])
    assert out.exit_code == 0, out.stderr
    assert json.loads(out.output)["run"] == str(Path("models") / result.run_dir.name)


def test_a_cache_with_other_preprocessing_is_refused_saying_what_differs(trained, tmp_path):
    root, cache, result = trained
    other = tmp_path / "other.h5"
    extract(data=root / "data", output=other, backbone="vgg16", size=32, frames=6, weights="none", quiet=True)
    with pytest.raises(CacheError, match="frames: 8 in the run, 6 in the cache"):
        evaluate(result.run_dir, cache=other)
    out = runner.invoke(app, ["evaluate", str(result.run_dir), "--cache", str(other)])
    assert out.exit_code == 2 and "frames" in out.stderr and "Traceback" not in out.stderr


def test_an_empty_split_is_one_sentence(trained):
    root, cache, result = trained
    with pytest.raises(FeatpipeError, match="no clips in the 'holdout' split.*test, train, val"):
        evaluate(result.run_dir, split="holdout")


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    out = runner.invoke(app, ["evaluate", str(tmp_path)])
    assert out.exit_code == 2 and "not a featpipe run directory" in out.stderr
    out = runner.invoke(app, ["evaluate", str(tmp_path / "models" / "latest")])
    assert out.exit_code == 2 and "featpipe train" in out.stderr


def _resplit(cache: Path, out: Path, moves: dict[str, str]) -> Path:
    """A copy of ``cache`` whose clips (by key) are moved to other splits, as a re-split would."""
    import shutil

    import h5py

    shutil.copy(cache, out)
    with h5py.File(out, "r+") as f:
        videos = f["video"].asstr()[:].tolist()
        splits = f["split"].asstr()[:].tolist()
        for video, split in moves.items():
            splits[videos.index(video)] = split
        del f["split"]
        f.create_dataset("split", data=splits, dtype=h5py.string_dtype())
    return out


def _clips(cache: Path, split: str) -> list[str]:
    import h5py

    with h5py.File(cache, "r") as f:
        return [v for v, s in zip(f["video"].asstr()[:], f["split"].asstr()[:]) if s == split]


def test_a_split_holding_training_clips_is_refused_naming_how_many(trained, tmp_path):
    """A test split re-drawn after training once scored a run on its own training clips, silently."""
    root, cache, result = trained
    moved = _clips(cache, "train")[:3]
    resplit = _resplit(cache, tmp_path / "resplit.h5", {v: "test" for v in moved})
    out = runner.invoke(app, ["evaluate", str(result.run_dir), "--cache", str(resplit), "--split", "test"])
    assert out.exit_code == 2, out.output + out.stderr
    assert "3 of the 7 clips in the 'test' split" in out.stderr and "were used to train this run" in out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    with pytest.raises(FeatpipeError, match="3 of the 7 clips"):
        evaluate(result.run_dir, cache=resplit)


def test_a_cache_changed_otherwise_since_training_is_scored_with_a_one_line_warning(trained, tmp_path):
    root, cache, result = trained
    changed = _resplit(cache, tmp_path / "changed.h5", {_clips(cache, "train")[0]: "val"})  # test split untouched
    out = runner.invoke(app, ["evaluate", str(result.run_dir), "--cache", str(changed), "--split", "test"])
    assert out.exit_code == 0, out.stderr
    assert out.stderr.startswith("warning: ") and out.stderr.count("\n") == 1
    assert "since this run was trained" in out.stderr and "fingerprint" in out.stderr
    assert "accuracy" in out.stdout
    same = runner.invoke(app, ["evaluate", str(result.run_dir), "--split", "test"])
    assert same.exit_code == 0 and same.stderr == "", "no warning for the cache the run was trained on"
    from featpipe.errors import RunWarning

    with pytest.warns(RunWarning, match="since this run was trained"):
        metrics = evaluate(result.run_dir, cache=changed)
    assert len(metrics["warnings"]) == 1


def test_a_run_from_before_run_identity_is_evaluated_with_a_warning(trained, tmp_path):
    import shutil

    root, cache, result = trained
    old = tmp_path / "old-run"
    shutil.copytree(result.run_dir, old)
    data = json.loads((old / "run.json").read_text())
    for key in ("run_id", "model_sha256", "train_clips", "val_clips", "run_format"):
        del data[key]
    (old / "run.json").write_text(json.dumps(data))
    out = runner.invoke(app, ["evaluate", str(old), "--json"])
    assert out.exit_code == 0, out.stderr
    assert "cannot be checked for clips the run was trained on" in out.stderr
    assert json.loads(out.stdout)["n"] == 4
