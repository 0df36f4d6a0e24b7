"""Stage two: training from a cache, the run directory contract, determinism, bad caches, quality."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from typer.testing import CliRunner

import featpipe.training.heads.layers  # noqa: F401  registers custom layers for safe-mode loading
from caches import synthetic_cache
from featpipe.cache.schema import SCHEMA_VERSION, CacheConfig, ClipRecord
from featpipe.cache.writer import CacheWriter
from featpipe.cli import app
from featpipe.errors import FeatpipeError
from featpipe.extraction.extract import extract
from featpipe.runs.rundir import resolve_run
from featpipe.training.train import train
from featpipe.video.sample_data import write_sample_data

runner = CliRunner()
FAST = dict(epochs=3, patience=3, quiet=True)


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    write_sample_data(root / "data", train=3, val=1, test=1, seed=0)
    out = root / "cache" / "vgg16.h5"
    extract(data=root / "data", output=out, backbone="vgg16", size=32, frames=8, weights="none", quiet=True)
    return out


def test_training_writes_a_complete_self_describing_run_directory(small_cache, tmp_path):
    result = train(cache=small_cache, rnn="gru", models_dir=tmp_path / "models", **FAST)
    run = result.run_dir
    for name in (
        "model.keras",
        "run.json",
        "history.csv",
        "curves.png",
        "confusion_matrix.png",
        "report.json",
        "report.txt",
        "report.html",
    ):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    info = json.loads((run / "run.json").read_text())
    with h5py.File(small_cache, "r") as f:
        for key in ("backbone", "weights", "weights_fingerprint", "input_size", "frames", "sampling"):
            assert info["preprocessing"][key] == np.asarray(f.attrs[key]).tolist(), key
        assert info["class_names"] == list(f.attrs["class_names"])
    assert info["config"]["head"] == "gru" and info["head"]["head"] == "gru"
    assert info["cache"] == str(small_cache.resolve()) and len(info["cache_fingerprint"]) == 16
    assert set(info["metrics"]) == {"val", "test"} and 0 <= info["metrics"]["test"]["accuracy"] <= 1
    assert run.name.startswith("vgg16-gru-")
    assert (tmp_path / "models" / "latest").read_text().strip() == run.name
    assert resolve_run(tmp_path / "models" / "latest") == run
    report = json.loads((run / "report.json").read_text())
    assert report["test"]["n"] == 4 and len(report["test"]["confusion_matrix"]) == 4
    # safe mode: no Lambda layers, no pickled code
    model = keras.saving.load_model(run / "model.keras", safe_mode=True)
    assert model.get_layer("standardize") is not None
    history = (run / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch") and len(history) == 1 + result.epochs_run


def test_standardisation_is_adapted_on_real_train_frames_only(small_cache, tmp_path):
    from featpipe.training.inputs import feature_stats, open_index

    result = train(cache=small_cache, rnn="mean", out=tmp_path / "run", refit=False, **FAST)
    model = keras.saving.load_model(result.run_dir / "model.keras")
    norm = model.get_layer("standardize")
    idx = open_index(small_cache)
    mean, var = feature_stats(idx, idx.rows("train"))
    np.testing.assert_allclose(np.ravel(norm.mean), mean, rtol=1e-5, atol=1e-5)
    # a refit model is standardised on what it trained on, train + val, and never on test
    refit = train(cache=small_cache, rnn="mean", out=tmp_path / "refit", refit=True, **FAST)
    norm = keras.saving.load_model(refit.run_dir / "model.keras").get_layer("standardize")
    both, _ = feature_stats(idx, np.sort(np.concatenate([idx.rows("train"), idx.rows("val")])))
    np.testing.assert_allclose(np.ravel(norm.mean), both, rtol=1e-5, atol=1e-5)
    assert not np.allclose(both, mean, rtol=1e-3)
    train_real = h5py.File(small_cache)["features"][np.sort(idx.rows("train"))][idx.mask[np.sort(idx.rows("train"))]]
    all_real = h5py.File(small_cache)["features"][:][idx.mask]
    assert not np.allclose(all_real.astype(np.float64).mean(0), train_real.astype(np.float64).mean(0)), (
        "the check above must be able to tell train-only stats from all-split stats"
    )


@pytest.mark.slow
def test_same_seed_same_cache_gives_the_same_metrics(small_cache, tmp_path):
    a = train(cache=small_cache, rnn="lstm", out=tmp_path / "a", seed=5, **FAST)
    b = train(cache=small_cache, rnn="lstm", out=tmp_path / "b", seed=5, **FAST)
    assert (a.run_dir / "report.json").read_text() == (b.run_dir / "report.json").read_text()
    assert (a.run_dir / "history.csv").read_text() == (b.run_dir / "history.csv").read_text()


def test_streaming_from_hdf5_trains_and_reports_it(small_cache, tmp_path):
    result = train(cache=small_cache, rnn="gru", out=tmp_path / "s", stream=True, **FAST)
    assert result.streamed
    assert json.loads((result.run_dir / "run.json").read_text())["streamed"] is True
    assert result.epochs_run == 3


def test_without_a_val_split_a_stratified_holdout_of_train_is_used(tmp_path):
    cache = synthetic_cache(tmp_path / "c.h5", splits=("train", "test"), classes=("a", "b", "c"), n=60)
    result = train(cache=cache, rnn="gru", out=tmp_path / "r", val_fraction=0.2, **FAST)
    info = json.loads((result.run_dir / "run.json").read_text())
    assert "stratified" in info["validation"]
    val = result.metrics["val"]
    assert val["n"] == 6  # 20 % of the 30 train clips
    assert all(val["per_class"][c]["support"] == 2 for c in ("a", "b", "c")), "every class in the hold-out"


def test_balanced_class_weight_trains_on_imbalanced_data(tmp_path):
    cache = synthetic_cache(tmp_path / "c.h5", classes=("a", "b", "b2", "b3"), n=40)
    result = train(cache=cache, rnn="mean", out=tmp_path / "r", class_weight="balanced", **FAST)
    assert json.loads((result.run_dir / "run.json").read_text())["config"]["class_weight"] == "balanced"


@pytest.mark.slow
def test_a_raw_frame_cache_is_told_by_its_backbone_and_trains_the_image_head_without_feature_statistics(tmp_path):
    """The raw entry's cache (uint8 frames, no network) is recognised by the registry's raw flag."""
    size, t = 8, 3
    rng = np.random.default_rng(0)
    path = tmp_path / "raw.h5"
    w = CacheWriter(
        path, CacheConfig("raw", "none", "raw-frames", size, t, "uniform", "uint8", (size, size, 3), ("a", "b"))
    )
    for i in range(12):
        frames = rng.integers(0, 256, (t, size, size, 3), dtype=np.uint8)
        w.append(ClipRecord(f"v{i:03d}.mp4", i % 2, ("train", "val", "test")[i % 3], t, frames, np.ones(t, bool)))
    w.finalize()
    result = train(cache=path, head="cnn-lstm", out=tmp_path / "run", units=4, epochs=1, patience=1, quiet=True)
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["preprocessing"]["backbone"] == "raw" and result.epochs_run == 1


def test_a_cache_without_train_split_is_refused(tmp_path):
    cache = synthetic_cache(tmp_path / "c.h5", splits=("val", "test"))
    with pytest.raises(FeatpipeError, match="no train split.*test, val"):
        train(cache=cache, out=tmp_path / "r", **FAST)


def test_a_single_class_cache_is_refused(tmp_path):
    cache = synthetic_cache(tmp_path / "c.h5", classes=("only",))
    with pytest.raises(FeatpipeError, match="single class"):
        train(cache=cache, out=tmp_path / "r", **FAST)


def test_nan_features_are_refused_before_training(tmp_path):
    cache = synthetic_cache(tmp_path / "c.h5", nan=True)
    with pytest.raises(FeatpipeError, match="v003.mp4.*NaN"):
        train(cache=cache, out=tmp_path / "r", **FAST)
    assert not (tmp_path / "r").exists(), "no useless run directory is left behind"


@pytest.mark.parametrize("kind", ["missing", "truncated", "foreign", "future"])
def test_bad_cache_files_are_one_sentence_and_exit_2(tmp_path, kind):
    path = tmp_path / "c.h5"
    if kind == "truncated":
        synthetic_cache(path)
        path.write_bytes(path.read_bytes()[:2000])
    elif kind == "foreign":
        with h5py.File(path, "w") as f:
            f["x"] = [1, 2, 3]
    elif kind == "future":
        with h5py.File(path, "w") as f:
            f.attrs["schema_version"] = SCHEMA_VERSION + 1
    result = runner.invoke(app, ["train", "--cache", str(path), "--epochs", "1", "--quiet"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output + result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_several_caches_without_cache_option_are_refused(tmp_path):
    synthetic_cache(tmp_path / "a.h5")
    synthetic_cache(tmp_path / "b.h5")
    result = runner.invoke(app, ["train", "--cache-dir", str(tmp_path), "--quiet"])
    assert result.exit_code == 2 and "Several caches" in result.stderr and "--cache" in result.stderr


def test_the_design_spelling_rnn_gru_works_from_the_cli(small_cache, tmp_path):
    result = runner.invoke(
        app,
        ["train", "--rnn", "gru", "--cache", str(small_cache), "--epochs", "2", "--models-dir", str(tmp_path / "m")],
    )
    assert result.exit_code == 0, result.output + result.stderr
    assert "accuracy" in result.output and "Run " in result.output


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_stray_trainers():
    """A failed signal test must not leave its 5000-epoch trainer running for the rest of the session."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _train_process(cache: Path, run: Path, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "featpipe",
        "train",
        "--cache",
        str(cache),
        "--epochs",
        "5000",
        "--patience",
        "5000",
        "--out",
        str(run),
        "--quiet",
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _STARTED.append(proc)
    return proc


def _temp_dirs(run: Path) -> list[Path]:
    """The hidden folders a run is written into before it is renamed into place."""
    return sorted(run.parent.glob(f".{run.name}.featpipe-*"))


@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_keeps_the_best_checkpoint_and_writes_the_run_directory(small_cache, tmp_path, sig, status):
    run = tmp_path / "run"
    proc = _train_process(small_cache, run)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        history = [p / "history.csv" for p in _temp_dirs(run)]  # the run is written beside its destination
        if history and history[0].exists() and len(history[0].read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    assert not run.exists(), "the run directory appears only when complete"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    assert "interrupted" in err and "best checkpoint" in err and "Traceback" not in err
    info = json.loads((run / "run.json").read_text())
    assert info["interrupted"] is True and info["epochs_run"] >= 3
    assert (run / "model.keras").is_file() and (run / "report.json").is_file()
    assert _temp_dirs(run) == []


@pytest.mark.slow
def test_a_signal_before_the_first_epoch_writes_nothing_and_keeps_the_old_run(tmp_path):
    """Ctrl-C before an epoch ended once left a new run.json beside the old model.keras."""
    old = train(cache=synthetic_cache(tmp_path / "small.h5"), rnn="mean", out=tmp_path / "run", epochs=1, quiet=True)
    before = {p.name: p.read_bytes() for p in old.run_dir.iterdir()}
    cache = synthetic_cache(tmp_path / "c.h5", n=3000)  # batch size 1: a thousand steps in the first epoch
    proc = _train_process(cache, old.run_dir, "--force", "--batch-size", "1")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not _temp_dirs(old.run_dir):
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "training stopped before its first epoch" in err and "no run directory" in err
    assert "finished clips" not in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in old.run_dir.iterdir()} == before, "the old run is untouched"
    assert _temp_dirs(old.run_dir) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5", "latest", "run", "small.h5"]


def test_a_ctrl_c_swallowed_by_a_gc_callback_still_stops_training(tmp_path):
    """Under load a SIGINT landed in JAX's garbage-collector callback, was printed as "Exception ignored", and
    train ran on for all its epochs. featpipe.runtime.signals remembers it and training raises it at the next batch."""
    import gc
    import os

    from featpipe.runtime import signals

    cache = synthetic_cache(tmp_path / "c.h5", n=300)
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    swallowed = []

    def gc_callback(phase, info):  # an exception raised in here is reported and ignored by the interpreter
        if phase == "start" and not swallowed:
            swallowed.append(True)
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(1000))  # the handler runs here, inside the callback

    try:
        signals.install()
        gc.callbacks.append(gc_callback)
        gc.collect()  # returns normally: the KeyboardInterrupt was swallowed
        gc.callbacks.remove(gc_callback)
        assert swallowed
        with pytest.raises(KeyboardInterrupt):  # not 3 epochs of 200 steps run to the end
            train(cache=cache, rnn="mean", out=tmp_path / "run", epochs=3, patience=3, batch_size=1, quiet=True)
        assert not (tmp_path / "run").exists()
    finally:
        if gc_callback in gc.callbacks:
            gc.callbacks.remove(gc_callback)
        signals.handled()
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def test_an_existing_run_needs_force_and_is_replaced_whole(tmp_path):
    cache = synthetic_cache(tmp_path / "c.h5")
    first = train(cache=cache, rnn="mean", out=tmp_path / "run", epochs=2, quiet=True)
    (first.run_dir / "curves.png").unlink()  # an old-only file: must not survive into the new run
    first_info = json.loads((first.run_dir / "run.json").read_text())
    result = runner.invoke(
        app, ["train", "--cache", str(cache), "--rnn", "mean", "--epochs", "1", "--quiet", "--out", str(first.run_dir)]
    )
    assert result.exit_code == 2 and "--force" in result.stderr and "already a run directory" in result.stderr
    assert json.loads((first.run_dir / "run.json").read_text()) == first_info
    with pytest.raises(FeatpipeError, match="force=True"):  # the API names its own parameter, not the flag
        train(cache=cache, rnn="mean", out=first.run_dir, epochs=1, quiet=True)
    result = runner.invoke(
        app,
        [
            "train",
            "--cache",
            str(cache),
            "--rnn",
            "mean",
            "--epochs",
            "1",
            "--quiet",
            "--out",
            str(first.run_dir),
            "--force",
        ],
    )
    assert result.exit_code == 0, result.stderr
    info = json.loads((first.run_dir / "run.json").read_text())
    assert info["run_id"] != first_info["run_id"] and info["epochs_run"] == 1
    assert (first.run_dir / "curves.png").is_file(), "every file is the new run's"
    from featpipe.runs.rundir import file_sha256

    assert file_sha256(first.run_dir / "model.keras") == info["model_sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5", "latest", "run"], "nothing left aside"
    assert (tmp_path / "latest").read_text().strip() == "run"


def test_run_json_records_the_clips_trained_and_validated_on(tmp_path):
    cache = synthetic_cache(tmp_path / "c.h5", splits=("train", "test"), classes=("a", "b", "c"), n=40)
    result = train(cache=cache, rnn="mean", out=tmp_path / "r", epochs=1, quiet=True, refit=False)
    info = json.loads((result.run_dir / "run.json").read_text())
    train_clips, val_clips = set(info["train_clips"]), set(info["val_clips"])
    assert len(train_clips) + len(val_clips) == 20 and not train_clips & val_clips  # a hold-out of the train split
    assert all(int(v[1:4]) % 2 == 0 for v in train_clips | val_clips), "only train-split clips"
    assert info["run_format"] == 2 and len(info["run_id"]) == 16


def test_a_shard_file_is_refused_unless_allowed(tmp_path):
    cache = synthetic_cache(tmp_path / "vgg16.shard-1-of-2.h5")
    result = runner.invoke(
        app, ["train", "--cache", str(cache), "--epochs", "1", "--quiet", "--models-dir", str(tmp_path / "m")]
    )
    assert result.exit_code == 2 and "shard 1 of 2" in result.stderr and "featpipe merge" in result.stderr
    assert "--allow-shard" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "m").exists()
    result = runner.invoke(
        app,
        [
            "train",
            "--cache",
            str(cache),
            "--rnn",
            "mean",
            "--epochs",
            "1",
            "--quiet",
            "--models-dir",
            str(tmp_path / "m"),
            "--allow-shard",
        ],
    )
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lr", "inf"], "--lr must be a finite number"),
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--lr", "0"], "--lr must be above 0"),
        (["--epochs", "0"], "--epochs must be between 1 and"),
        (["--batch-size", "100000000"], "--batch-size must be between 1 and"),
        (["--patience", "-1"], "--patience must be between 1 and"),
        (["--units", "0"], "--units must be between 1 and"),
        (["--layers", "1000"], "--layers must be between 1 and"),
        (["--dropout", "1"], "--dropout must be at least 0 and below 1"),
        (["--num-heads", "0"], "--num-heads must be between 1 and"),
        (["--val-fraction", "0"], "--val-fraction must be above 0"),
        (["--seed", "-1"], "--seed must be between 0 and"),
        (["--l2", "-0.1"], "--l2 must be at least 0 and at most 100"),
        (["--l2", "nan"], "--l2 must be a finite number"),
    ],
)
def test_bad_options_are_one_sentence_before_training(tmp_path, args, message):
    cache = synthetic_cache(tmp_path / "c.h5")
    result = runner.invoke(app, ["train", "--cache", str(cache), "--out", str(tmp_path / "r"), "--quiet", *args])
    assert result.exit_code == 2, result.output + result.stderr
    assert result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "r").exists() and list(tmp_path.iterdir()) == [cache]


def test_out_naming_a_file_is_one_sentence(tmp_path):
    cache = synthetic_cache(tmp_path / "c.h5")
    (tmp_path / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["train", "--cache", str(cache), "--out", str(tmp_path / "notes.txt"), "--quiet"])
    assert result.exit_code == 2 and "--out must be a folder" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_read_only_models_folder_is_one_sentence_and_leaves_nothing(tmp_path, monkeypatch):
    """We run as root, where chmod does not stop writes: the folder's refusal is injected instead."""
    import errno

    cache = synthetic_cache(tmp_path / "c.h5")
    models = tmp_path / "models"
    models.mkdir()
    real_mkdir = Path.mkdir

    def read_only_mkdir(self, *args, **kwargs):
        if self.parent == models:
            raise PermissionError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only_mkdir)
    result = runner.invoke(
        app, ["train", "--cache", str(cache), "--rnn", "mean", "--epochs", "1", "--quiet", "--models-dir", str(models)]
    )
    assert result.exit_code == 2, result.output + result.stderr
    assert "Read-only file system" in result.stderr and "a folder you can write to" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert list(models.iterdir()) == []


@pytest.fixture(scope="module")
def quality_cache(tmp_path_factory) -> Path:
    """The full built-in sample data through a small random backbone: the README's quality claim."""
    root = tmp_path_factory.mktemp("quality")
    write_sample_data(root / "data")
    out = root / "vgg16-64.h5"
    extract(data=root / "data", output=out, backbone="vgg16", size=64, weights="none", quiet=True)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("head", ["gru", "lstm"])
def test_recurrent_heads_reach_095_test_accuracy_on_the_sample_data(quality_cache, tmp_path, head):
    result = train(cache=quality_cache, rnn=head, out=tmp_path / head, quiet=True)
    assert result.metrics["test"]["accuracy"] >= 0.95


@pytest.mark.slow
def test_the_order_blind_mean_head_stays_at_chance_on_order_only_pairs(quality_cache, tmp_path):
    """mean can tell the colour pair from the size pair, never the direction inside a pair."""
    result = train(cache=quality_cache, rnn="mean", out=tmp_path / "mean", quiet=True)
    cm = np.array(result.metrics["test"]["confusion_matrix"])
    names = result.metrics["test"]["class_names"]
    pairs = [("blue_to_red", "red_to_blue"), ("grow", "shrink")]
    for a, b in pairs:
        i, j = names.index(a), names.index(b)
        within = cm[np.ix_([i, j], [i, j])]
        direction_accuracy = np.trace(within) / within.sum()
        assert 0.2 <= direction_accuracy <= 0.8, (a, b, within)
    assert result.metrics["test"]["accuracy"] <= 0.7


def test_a_full_disk_while_writing_the_run_keeps_the_old_run_and_leaves_nothing(tmp_path, monkeypatch):
    """Fault injection: the disk fills up while the report is written, after training."""
    import errno

    import featpipe.runs.metrics

    cache = synthetic_cache(tmp_path / "c.h5")
    old = train(cache=cache, rnn="mean", out=tmp_path / "run", epochs=1, quiet=True)
    before = {p.name: p.read_bytes() for p in old.run_dir.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(featpipe.runs.metrics, "plot_confusion_matrix", disk_full)
    result = runner.invoke(
        app,
        [
            "train",
            "--cache",
            str(cache),
            "--rnn",
            "mean",
            "--epochs",
            "1",
            "--quiet",
            "--out",
            str(old.run_dir),
            "--force",
        ],
    )
    assert result.exit_code == 1, result.output + result.stderr
    assert "No space left on device" in result.stderr and "nothing was kept" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert {p.name: p.read_bytes() for p in old.run_dir.iterdir()} == before, "the old run is untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5", "latest", "run"]


def test_training_on_fewer_frames_than_cached_is_recorded_and_evaluate_reproduces_it(small_cache, tmp_path):
    from featpipe.errors import OptionError
    from featpipe.runs.evaluate import evaluate

    result = train(cache=small_cache, rnn="gru", frames=4, out=tmp_path / "r", **FAST)
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["config"]["frames"] == 4 and info["head"]["frames"] == 4
    assert info["config"]["shortcut"] == 4 and info["config"]["bottleneck"] == 32, "resolved defaults are recorded"
    assert info["config"]["l2"] == info["head"]["l2"] == 0.1
    again = evaluate(result.run_dir, split="test")
    assert again["accuracy"] == result.metrics["test"]["accuracy"]
    np.testing.assert_allclose(again["confusion_matrix"], result.metrics["test"]["confusion_matrix"])
    with pytest.raises(OptionError, match="frames must be between 1 and 8.*re-extract"):
        train(cache=small_cache, frames=9, out=tmp_path / "too-many", **FAST)


def test_inside_fit_a_signal_is_recorded_and_raised_at_the_next_safe_point_not_where_it_lands():
    """Raised inside TensorFlow's C++ callbacks a Ctrl-C once surfaced as "SystemError: bad argument to internal
    function"; inside signals.deferred() the handler only records it, and raise_pending() raises it."""
    import os

    from featpipe.runtime import signals

    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        signals.install()
        with pytest.raises(KeyboardInterrupt):
            with signals.deferred():
                os.kill(os.getpid(), signal.SIGINT)
                sum(range(100_000))  # the handler has run by now, and raised nothing here
                reached = True
                signals.raise_pending()
        assert reached
        with pytest.raises(signals.Terminated):  # still pending when the block ends: raised on leaving it
            with signals.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                sum(range(100_000))
        with signals.deferred():  # nothing pending: nothing raised
            pass
    finally:
        signals.handled()
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


@pytest.fixture
def installed_signals():
    """featpipe's SIGINT/SIGTERM handlers, as the CLI installs them; the previous ones restored after."""
    from featpipe.runtime import signals

    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signals.install()
    yield signals
    signals.handled()
    signal.signal(signal.SIGINT, previous[0])
    signal.signal(signal.SIGTERM, previous[1])


def test_a_signal_while_the_run_is_written_after_fit_saves_it_as_interrupted(tmp_path, monkeypatch, installed_signals):
    """After fit, a signal landing where the run is written (reports, plots) was raised there: the finished
    training was thrown away and the CLI said no run directory was written. It now marks the run interrupted."""
    import os

    import featpipe.runs.metrics

    real_plot = featpipe.runs.metrics.plot_curves

    def plot_then_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(100_000))  # the handler has run by now
        return real_plot(*args, **kwargs)

    monkeypatch.setattr(featpipe.runs.metrics, "plot_curves", plot_then_sigterm)
    try:
        result = train(cache=synthetic_cache(tmp_path / "c.h5"), rnn="mean", out=tmp_path / "run", **FAST)
    except KeyboardInterrupt:
        pytest.fail("the signal threw the trained run away")
    assert result.interrupted and result.interrupted_by == "SIGTERM" and result.epochs_run == 3
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["interrupted"] is True and (tmp_path / "run" / "model.keras").is_file()


def test_a_signal_after_the_run_is_written_exits_130_and_says_the_run_is_complete(
    tmp_path, monkeypatch, installed_signals
):
    """A Ctrl-C arriving once the run was complete was raised in the CLI's own code: exit 130 with "no run
    directory was written" beside a complete run (or, at exit, a silent death by the signal)."""
    import os

    import featpipe

    real_train = featpipe.train

    def train_then_sigint(*args, **kwargs):
        result = real_train(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        sum(range(100_000))
        return result

    monkeypatch.setattr(featpipe, "train", train_then_sigint)
    cache = synthetic_cache(tmp_path / "c.h5")
    result = runner.invoke(
        app,
        ["train", "--cache", str(cache), "--head", "mean", "--epochs", "2", "--out", str(tmp_path / "run"), "--quiet"],
    )
    assert result.exit_code == 130, result.output
    assert "the run was already complete; it is kept in" in result.output and "no run directory" not in result.output
    assert json.loads((tmp_path / "run" / "run.json").read_text())["interrupted"] is False


@pytest.mark.slow
def test_a_signal_at_an_epoch_boundary_or_mid_epoch_always_stops_the_run_as_interrupted(tmp_path, installed_signals):
    """Ctrl-C or SIGTERM sent within milliseconds of an epoch's history row appearing, or at a random moment
    in the epoch, must stop the run after the batch and save it as interrupted, every time."""
    import os
    import random
    import threading

    cache = synthetic_cache(tmp_path / "c.h5", n=48)
    rng = random.Random(0)
    for i, (sig, mid) in enumerate([(s, m) for m in (False, True) for s in (signal.SIGINT, signal.SIGTERM)]):
        run = tmp_path / f"run{i}"
        sent = threading.Event()

        def watch(run=run, sig=sig, mid=mid, sent=sent):  # row 3 of history.csv: the end of epoch 2
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not sent.is_set():
                for history in run.parent.glob(f".{run.name}.featpipe-*/history.csv"):
                    try:
                        rows = len(history.read_text().splitlines())
                    except FileNotFoundError:
                        rows = 0
                    if rows >= 3:
                        time.sleep(rng.uniform(0, 0.01) if mid else 0)
                        os.kill(os.getpid(), sig)
                        sent.set()
                time.sleep(0.0005)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        result = train(cache=cache, rnn="mean", out=run, epochs=400, patience=400, batch_size=4, quiet=True)
        sent.set()
        watcher.join()
        where = f"run {i}: {sig.name} {'mid-epoch' if mid else 'at the epoch boundary'}"
        assert result.interrupted and result.interrupted_by == sig.name, where
        info = json.loads((run / "run.json").read_text())
        assert info["interrupted"] is True and 2 <= info["epochs_run"] < 400, where
        assert len((run / "history.csv").read_text().splitlines()) == info["epochs_run"] + 1, where


@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_as_the_published_run_appears_exits_with_its_status_and_a_sentence(tmp_path, sig, status):
    """Sent the moment run.json appears in the published run (the command is about to end): the process
    used to be killed by it in the interpreter's last seconds (status -2/-15, no word) or ignore it (0).
    It must end with 130/143 and a sentence, and the published run stays whole."""
    cache = synthetic_cache(tmp_path / "c.h5", n=24)
    conclusive = 0
    for attempt in range(2):
        run = tmp_path / f"run{attempt}"
        proc = _train_process(cache, run, "--epochs", "3", "--patience", "3")
        deadline = time.monotonic() + 120
        while proc.poll() is None and not (run / "run.json").exists() and time.monotonic() < deadline:
            time.sleep(0.0005)
        if proc.poll() is not None:  # it ended before we could send: nothing to learn from this attempt
            proc.communicate()
            continue
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        conclusive += 1
        assert proc.returncode == status, f"attempt {attempt}: status {proc.returncode}\n{err[-1500:]}"
        assert err.strip(), "a sentence on stderr"  # which one depends on where the signal lands
        assert json.loads((run / "run.json").read_text())["interrupted"] is False  # the run itself is whole
        break  # one conclusive attempt is the check; a second one only when the first ended too soon
    assert conclusive, "the process always ended before the signal could be sent"


@pytest.mark.slow
def test_train_stream_reads_the_cache_it_opened_while_the_cache_is_compacted(tmp_path, monkeypatch):
    """`featpipe merge --compact` (or an extraction) rewriting the cache mid-fit takes no part file from the reader."""
    from featpipe.cache.schema import parts_dir
    from featpipe.cache.shards import compact_cache
    from featpipe.training.streaming import H5Batches

    monkeypatch.setenv("FEATPIPE_ONE_FILE_MB", "0")
    cache = synthetic_cache(tmp_path / "c.h5")
    assert parts_dir(cache).is_dir()
    epoch_end = H5Batches.on_epoch_end

    def compact_once(self):
        if parts_dir(cache).is_dir() and not hasattr(compact_once, "done"):
            compact_once.done = True
            compact_cache(cache)
        epoch_end(self)

    monkeypatch.setattr(H5Batches, "on_epoch_end", compact_once)
    result = train(cache=cache, out=tmp_path / "run", stream=True, epochs=2, refit=False, units=4, quiet=True)
    assert compact_once.done and result.streamed and result.diverged is None
    assert all(np.isfinite(h["loss"]) and np.isfinite(h["val_loss"]) for h in result.history)
