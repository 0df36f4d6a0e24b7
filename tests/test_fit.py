"""featpipe.training.fit: refit on train + val, checkpoints that survive an interrupt, NaN losses."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
from typer.testing import CliRunner

import featpipe.training.heads.layers  # noqa: F401  registers custom layers for safe-mode loading
from caches import synthetic_cache
from featpipe.cli import app
from featpipe.errors import FeatpipeError
from featpipe.training.train import train

runner = CliRunner()


@pytest.mark.slow
def test_a_small_train_split_is_refit_on_train_and_val_for_the_chosen_epochs(tmp_path):
    cache = synthetic_cache(tmp_path / "c.h5", classes=("a", "b"), n=36)  # 6 train clips per class: refit by default
    result = train(cache=cache, rnn="gru", out=tmp_path / "r", epochs=6, patience=2, quiet=True)
    info = json.loads((result.run_dir / "run.json").read_text())
    assert 1 <= result.best_epoch <= 6 and result.refit_epochs == result.best_epoch == info["refit_epochs"]
    assert set(info["val_clips"]) <= set(info["train_clips"]), "the final model was trained on the val clips too"
    assert len(info["train_clips"]) == 24 and len(info["val_clips"]) == 12
    report = json.loads((result.run_dir / "report.json").read_text())
    assert set(report) == {"val", "test"}, "val scores of the selected model are still reported"
    from featpipe.runs.rundir import file_sha256

    assert file_sha256(result.run_dir / "model.keras") == info["model_sha256"]
    assert sorted(p.name for p in result.run_dir.iterdir()) == sorted(
        ["model.keras", "run.json", "history.csv", "curves.png", "confusion_matrix.png", "report.json", "report.txt"]
        + ["report.html"]
    )
    # the refit model is what evaluate scores, and a val split it was trained on is refused with the reason
    from featpipe.runs.evaluate import evaluate

    assert evaluate(result.run_dir, split="test")["accuracy"] == pytest.approx(report["test"]["accuracy"])
    with pytest.raises(FeatpipeError, match="refit on train \\+ val.*--no-refit"):
        evaluate(result.run_dir, split="val")
    again = train(cache=cache, rnn="gru", out=tmp_path / "r2", epochs=6, patience=2, quiet=True)
    assert again.metrics["test"] == result.metrics["test"], "same seed, same refit model"


@pytest.mark.slow
def test_refit_is_off_from_50_train_clips_per_class_and_can_be_forced_either_way(tmp_path):
    from featpipe.training.fit import refit_wanted
    from featpipe.training.inputs import open_index
    from featpipe.training.options import TrainOptions

    big = open_index(synthetic_cache(tmp_path / "big.h5", classes=("a", "b"), n=300))  # 50 train clips per class
    small = open_index(synthetic_cache(tmp_path / "small.h5", classes=("a", "b"), n=294))  # 49 per class
    assert not refit_wanted(TrainOptions(), big, big.rows("train"))
    assert refit_wanted(TrainOptions(), small, small.rows("train"))
    assert refit_wanted(TrainOptions(refit=True), big, big.rows("train"))
    assert not refit_wanted(TrainOptions(refit=False), small, small.rows("train"))
    result = train(cache=tmp_path / "small.h5", rnn="mean", out=tmp_path / "r", epochs=2, quiet=True, refit=False)
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["refit_epochs"] == 0 and not set(info["train_clips"]) & set(info["val_clips"])
    out = runner.invoke(
        app,
        [
            "train",
            "--cache",
            str(tmp_path / "big.h5"),
            "--head",
            "mean",
            "--epochs",
            "2",
            "--quiet",
            "--out",
            str(tmp_path / "cli"),
            "--refit",
        ],
    )
    assert out.exit_code == 0, out.stderr
    assert "refit on train + val for" in out.output
    assert json.loads((tmp_path / "cli" / "run.json").read_text())["refit_epochs"] >= 1


def test_ctrl_c_during_the_refit_keeps_the_selected_model(tmp_path, monkeypatch):
    cache = synthetic_cache(tmp_path / "c.h5", classes=("a", "b"), n=36)
    calls = []
    fit = keras.Model.fit

    def fit_then_interrupt(self, *args, **kwargs):  # the second fit of a run is the refit
        calls.append(kwargs.get("epochs"))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", fit_then_interrupt)
    result = train(cache=cache, rnn="mean", out=tmp_path / "r", epochs=3, quiet=True)
    info = json.loads((result.run_dir / "run.json").read_text())
    assert len(calls) == 2 and result.interrupted and result.refit_epochs == 0
    assert info["refit_epochs"] == 0 and info["interrupted"] and not set(info["train_clips"]) & set(info["val_clips"])
    assert sorted(p.name for p in result.run_dir.iterdir()) == sorted(
        ["model.keras", "run.json", "history.csv", "curves.png", "confusion_matrix.png", "report.json", "report.txt"]
        + ["report.html"]
    )


def test_an_interrupt_inside_a_checkpoint_write_keeps_the_previous_best_whole(tmp_path, monkeypatch):
    """Ctrl-C landing while ModelCheckpoint writes model.keras: the half-written file never replaces the last
    complete checkpoint, and the run directory is written from that one (a SIGTERM test once hit this race)."""
    synthetic = synthetic_cache(tmp_path / "c.h5", n=48)
    real_save = keras.Model.save
    calls = []

    def save_then_interrupt(self, filepath, *args, **kwargs):
        calls.append(Path(filepath).name)
        if len(calls) == 2:  # the second improving epoch: a partial zip, then the signal
            Path(filepath).write_bytes(b"PK\x03\x04 half a checkpoint")
            raise KeyboardInterrupt
        return real_save(self, filepath, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "save", save_then_interrupt)
    result = train(cache=synthetic, rnn="segments", epochs=30, patience=30, lr=0.05, out=tmp_path / "r", quiet=True)
    monkeypatch.undo()
    assert result.interrupted and len(calls) >= 2
    assert sorted(p.name for p in result.run_dir.iterdir() if "model" in p.name) == ["model.keras"]
    model = keras.saving.load_model(result.run_dir / "model.keras", safe_mode=True)
    assert model.name == "featpipe_segments" and result.metrics["test"]["n"] > 0


# ----------------------------------------------------------------------------- NaN losses, a cache rewritten mid-fit


def poison_weights_at_epoch(monkeypatch, epoch: int) -> None:
    """From the start of ``epoch`` (0-based) every weight is NaN, so every loss after is NaN (as after a blow-up)."""

    def on_epoch_begin(self, e, logs=None):
        if e == epoch:
            for v in self.model.trainable_variables:
                v.assign(np.full(v.shape, np.nan, dtype="float32"))

    monkeypatch.setattr(keras.callbacks.CSVLogger, "on_epoch_begin", on_epoch_begin, raising=False)


@pytest.mark.slow
def test_a_nan_loss_stops_training_and_the_run_keeps_the_best_finite_epoch(tmp_path, monkeypatch):
    cache = synthetic_cache(tmp_path / "c.h5")
    poison_weights_at_epoch(monkeypatch, 2)
    out = tmp_path / "run"
    args = ["--epochs", "40", "--patience", "40", "--units", "4", "--out", str(out), "--quiet"]
    result = runner.invoke(app, ["train", "--cache", str(cache), *args])
    assert result.exit_code == 1, result.output
    assert "stopped: the training loss became NaN in epoch 3" in result.output and "Traceback" not in result.output
    info = json.loads((out / "run.json").read_text())
    assert info["epochs_run"] == 3, "stopped after the epoch the loss became NaN in, not after --patience more"
    assert info["best_epoch"] in (1, 2) and "NaN in epoch 3" in info["diverged"]
    history = [line.split(",") for line in (out / "history.csv").read_text().splitlines()[1:]]
    assert all(np.isfinite(float(v)) for v in history[info["best_epoch"] - 1][1:])
    model = keras.saving.load_model(out / "model.keras")
    x = {"features": np.zeros((2, 4, 6), np.float32), "mask": np.ones((2, 4), bool)}
    assert np.isfinite(model.predict(x, verbose=0)).all(), "model.keras is the best finite epoch's"


def test_a_nan_loss_in_the_first_epoch_writes_no_run_and_says_so(tmp_path, monkeypatch):
    cache = synthetic_cache(tmp_path / "c.h5")
    poison_weights_at_epoch(monkeypatch, 0)
    with pytest.raises(FeatpipeError, match="NaN in epoch 1.*no run directory was written") as err:
        train(cache=cache, out=tmp_path / "run", epochs=5, patience=5, units=4, quiet=True)
    assert err.value.exit_code == 1
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".*run*"))
