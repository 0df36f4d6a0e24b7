"""Tracking: `train --tensorboard DIR` read back with TensorBoard's own reader, `train/tune --mlflow URI` read back
with MLflow's client from a sqlite store, and what happens without MLflow or with a store that fails.

The MLflow tests are marked ``mlflow`` (they need the extra: `make test-mlflow`); the TensorBoard test and the
missing-extra test run in `make test` (tensorboard comes with the dev extra).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import featpipe.training.tune as tune_module
from caches import synthetic_cache, tiny_cache
from featpipe.cli import app
from featpipe.training.train import train

runner = CliRunner()
FAST = ["--head", "mean", "--epochs", "2", "--patience", "2", "--no-refit", "--quiet"]


def _train(cache: Path, models: Path, *extra: str):
    result = runner.invoke(app, ["train", str(cache), *FAST, "--models-dir", str(models), *extra])
    assert "Traceback" not in result.output + result.stderr, result.output + result.stderr
    return result


def _run_dir(models: Path) -> Path:
    return models / (models / "latest").read_text().strip()


def _history(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "history.csv")


# ----------------------------------------------------------------------------- TensorBoard


def _scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(folder))
    events.Reload()
    # Keras 3 writes scalars with tf.summary: TensorBoard reads them as scalar tensors
    return [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)]


def test_train_tensorboard_writes_one_loss_and_accuracy_per_epoch_equal_to_history_csv(tmp_path):
    cache = synthetic_cache(tmp_path / "c.h5")
    tb = tmp_path / "tb"
    result = _train(cache, tmp_path / "models", "--tensorboard", str(tb))
    assert result.exit_code == 0, result.output + result.stderr
    run_dir = _run_dir(tmp_path / "models")
    history = _history(run_dir)
    assert len(history) == 2
    assert sorted(p.name for p in tb.iterdir()) == [run_dir.name]  # DIR/<run name>: many runs side by side
    for folder, prefix in (("train", ""), ("validation", "val_")):
        for metric in ("loss", "accuracy"):
            scalars = _scalars(tb / run_dir.name / folder, f"epoch_{metric}")
            assert [step for step, _ in scalars] == list(history["epoch"])
            assert [v for _, v in scalars] == pytest.approx(list(history[prefix + metric]), rel=1e-6)


def test_a_tensorboard_folder_that_cannot_be_made_is_one_warning_and_the_run_is_complete(tmp_path):
    cache = synthetic_cache(tmp_path / "c.h5")
    (tmp_path / "a-file").write_text("not a folder\n")
    result = _train(cache, tmp_path / "models", "--tensorboard", str(tmp_path / "a-file" / "tb"))
    assert result.exit_code == 0, result.output + result.stderr
    warned = [line for line in result.stderr.splitlines() if "TensorBoard" in line]
    assert len(warned) == 1 and "the run itself is not affected" in warned[0]
    run_dir = _run_dir(tmp_path / "models")
    assert all((run_dir / name).is_file() for name in ("run.json", "model.keras", "report.json", "report.html"))


def test_tune_refuses_a_tensorboard_folder_that_cannot_be_made_before_the_search(tmp_path):
    cache = synthetic_cache(tmp_path / "c.h5")
    (tmp_path / "a-file").write_text("not a folder\n")
    args = ["tune", str(cache), "--trials", "1", "--out", str(tmp_path / "tune"), "--models-dir", str(tmp_path)]
    result = runner.invoke(app, [*args, "--tensorboard", str(tmp_path / "a-file" / "tb")])
    assert result.exit_code == 2, result.output + result.stderr
    assert "--tensorboard" in result.stderr and "Traceback" not in result.output + result.stderr
    assert not (tmp_path / "tune" / "study.db").exists()


# ----------------------------------------------------------------------------- MLflow not installed


@pytest.mark.parametrize("command", ["train", "tune"])
def test_mlflow_without_the_extra_exits_2_naming_the_install_before_any_work(tmp_path, monkeypatch, command):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as in a venv without the mlflow extra
    cache = synthetic_cache(tmp_path / "c.h5")
    models = tmp_path / "models"
    args = [command, str(cache), "--models-dir", str(models), "--mlflow", f"sqlite:///{tmp_path / 'm.db'}"]
    result = runner.invoke(app, [*args, *(["--trials", "1"] if command == "tune" else [])])
    assert result.exit_code == 2, result.output + result.stderr
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in result.output
    assert 'pip install "featpipe[mlflow]"' in message and "--mlflow" in message
    assert not models.exists() and not (tmp_path / "m.db").exists()


# ----------------------------------------------------------------------------- MLflow round trips


def _client(db: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{db}")


def _runs(client, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    return client.search_runs([found.experiment_id])


@pytest.mark.mlflow
def test_train_mlflow_logs_params_epochs_final_metrics_and_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's sqlite store keeps artifacts in ./mlruns
    cache = synthetic_cache(tmp_path / "c.h5")
    db = tmp_path / "mlflow.db"
    result = _train(cache, tmp_path / "models", "--mlflow", f"sqlite:///{db}", "--mlflow-experiment", "clips")
    assert result.exit_code == 0, result.output + result.stderr
    run_dir = _run_dir(tmp_path / "models")
    client = _client(db)
    (run,) = _runs(client, "clips")
    assert run.info.run_name == run_dir.name and run.info.status == "FINISHED"
    params = run.data.params
    assert params["head"] == "mean" and params["backbone"] == "vgg16" and params["frames"] == "4"
    assert float(params["lr"]) == 3e-3 and params["epochs"] == "2"
    history = _history(run_dir)
    for metric in ("loss", "accuracy", "val_loss", "val_accuracy"):
        logged = client.get_metric_history(run.info.run_id, metric)
        assert [m.step for m in sorted(logged, key=lambda m: m.step)] == list(history["epoch"])
        assert [m.value for m in sorted(logged, key=lambda m: m.step)] == pytest.approx(list(history[metric]))
    report = json.loads((run_dir / "report.json").read_text())
    for split in ("val", "test"):
        assert run.data.metrics[f"final_{split}_accuracy"] == pytest.approx(report[split]["accuracy"])
        assert run.data.metrics[f"final_{split}_macro_f1"] == pytest.approx(report[split]["macro_f1"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "run.json", "history.csv", "model.keras"} <= artifacts


@pytest.mark.mlflow
@pytest.mark.parametrize("store", ["server down", "not a database"])
def test_a_failing_tracking_store_is_one_warning_and_the_run_is_complete(tmp_path, monkeypatch, store):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once instead of retrying for minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    (tmp_path / "mlflow.db").write_text("a damaged file, not an SQLite database\n")
    # the server's URI carries a password: run.json and the warning show it as ***
    uri = "http://me:s3cret@127.0.0.1:9" if store == "server down" else f"sqlite:///{tmp_path / 'mlflow.db'}"
    shown = uri.replace("s3cret", "***")
    cache = synthetic_cache(tmp_path / "c.h5")
    result = _train(cache, tmp_path / "models", "--mlflow", uri)
    assert result.exit_code == 0, result.output + result.stderr
    warned = [line for line in result.stderr.splitlines() if "MLflow tracking" in line]
    assert len(warned) == 1 and shown in warned[0] and "the run itself is not affected" in warned[0]
    run_dir = _run_dir(tmp_path / "models")
    assert all((run_dir / name).is_file() for name in ("run.json", "model.keras", "report.json", "report.html"))
    assert json.loads((run_dir / "run.json").read_text())["config"]["mlflow"] == shown
    assert "s3cret" not in result.stderr + (run_dir / "run.json").read_text()


@pytest.mark.mlflow
def test_tune_mlflow_and_tensorboard_log_each_trial_and_the_retrained_best(tmp_path, monkeypatch):
    """--mlflow: a parent run with the trials and the retrained best as children; --tensorboard: every fit's events."""
    monkeypatch.chdir(tmp_path)
    # the retrained best with train's defaults runs 150 epochs (patience 20): 2 are enough to see where it is logged
    monkeypatch.setattr(tune_module, "train", lambda **kwargs: train(**{**kwargs, "epochs": 2, "patience": 1}))
    cache = tiny_cache(tmp_path / "c.h5")
    db = tmp_path / "mlflow.db"
    args = ["tune", str(cache), "--heads", "segments,mean", "--trials", "2", "--epochs", "2", "--patience", "1"]
    args += ["--out", str(tmp_path / "tune"), "--models-dir", str(tmp_path / "models"), "--mlflow", f"sqlite:///{db}"]
    args += ["--tensorboard", str(tmp_path / "tb")]  # tune's TensorBoard events are checked here too: one search
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output + result.stderr
    board = json.loads((tmp_path / "tune" / "leaderboard.json").read_text())["trials"]
    runs = _runs(_client(db), "featpipe")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1 == len(board) + 1
    trials = {r.info.run_name: r for r in children if r.info.run_name.startswith("trial-")}
    assert sorted(trials) == sorted(f"trial-{row['number']}" for row in board)
    for row in board:
        trial = trials[f"trial-{row['number']}"]
        assert trial.data.metrics["mean_val_accuracy"] == pytest.approx(row["mean"])
        assert trial.data.params["rnn"] == row["params"]["rnn"]
    best_run = _run_dir(tmp_path / "models")
    (retrained,) = [r for r in children if r.info.run_name == best_run.name]
    assert retrained.info.status == "FINISHED" and "final_test_accuracy" in retrained.data.metrics
    assert parent.data.metrics["best_mean_val_accuracy"] == pytest.approx(board[0]["mean"])
    parent_files = {a.path for a in _client(db).list_artifacts(parent.info.run_id)}
    assert {"leaderboard.csv", "report.html", "best.json"} <= parent_files
    # --tensorboard: each fit of each trial in DIR/trial-N/fit-K, the retrained best in DIR/<run name>
    fits = len(board[0]["scores"])
    expected = {f"trial-{row['number']}/fit-{k}" for row in board for k in range(fits)}
    written = {f"{p.parent.name}/{p.name}" for p in (tmp_path / "tb").glob("trial-*/fit-*")}
    assert written == expected
    for trial_fit in expected:
        assert len(_scalars(tmp_path / "tb" / trial_fit / "validation", "epoch_accuracy")) >= 1
    assert len(_scalars(tmp_path / "tb" / best_run.name / "train", "epoch_loss")) == len(_history(best_run))


def test_a_password_in_a_tracking_uri_is_never_shown():
    from featpipe.runs.tracking import redact_uri

    assert redact_uri("https://me:s3cret@mlflow.example.org:5000/x") == "https://me:***@mlflow.example.org:5000/x"
    assert redact_uri("https://me@mlflow.example.org") == "https://me@mlflow.example.org"
    assert redact_uri("sqlite:///mlflow.db") == "sqlite:///mlflow.db"
    assert redact_uri(None) is None
