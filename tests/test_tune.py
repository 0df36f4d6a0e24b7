"""featpipe tune: stratified folds, the search's outputs, resuming after Ctrl-C; and the quality claims
of issue 10 on the hard sample set (default gru/lstm vs segments and the linear probe, mean at chance)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from featpipe.cache import CacheConfig, CacheWriter, ClipRecord
from featpipe.errors import FeatpipeError, OptionError
from featpipe.tune import TuneOptions, plan_fits, stratified_folds


def tiny_cache(path: Path, n: int = 48, val_every: int = 6) -> Path:
    """4 classes told apart by a rising or falling feature 0 (order) and feature 1 (pair)."""
    t, d = 4, 6
    rng = np.random.default_rng(0)
    names = ("a", "b", "c", "d")
    w = CacheWriter(path, CacheConfig("vgg16", "none", "fp", 32, t, "uniform", "float32", (d,), names))
    for i in range(n):
        label = i % 4
        feats = rng.normal(0, 0.3, (t, d)).astype(np.float32)
        feats[:, 0] += np.linspace(-1, 1, t) * (1 if label % 2 else -1)
        feats[:, 1] += 1.0 if label >= 2 else -1.0
        split = "test" if i % 8 == 7 else ("val" if i % val_every == 0 else "train")
        w.append(ClipRecord(f"v{i:03d}.mp4", label, split, t, feats, np.ones(t, bool)))
    w.finalize()
    return path


# ---------------------------------------------------------------- folds


def test_stratified_folds_partition_the_clips_and_spread_every_class_evenly():
    labels = np.array([0] * 9 + [1] * 6 + [2] * 4)
    folds = stratified_folds(labels, 3, seed=1)
    val = np.concatenate([va for _, va in folds])
    assert sorted(val.tolist()) == list(range(len(labels))), "every clip is in exactly one val fold"
    for train, va in folds:
        assert not set(train) & set(va) and len(train) + len(va) == len(labels)
        counts = np.bincount(labels[va], minlength=3)
        assert counts[0] == 3 and counts[1] == 2 and counts[2] in (1, 2), counts
    again = stratified_folds(labels, 3, seed=1)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again)), "the same seed, the same folds"


def test_a_class_smaller_than_the_fold_count_is_refused_with_what_to_do():
    with pytest.raises(FeatpipeError, match="fewer than the 3 folds.*--cv seeds"):
        stratified_folds(np.array([0, 0, 0, 1, 1]), 3, seed=0)


def test_small_val_splits_are_scored_by_kfold_on_train_plus_val_and_large_ones_by_seeds(tmp_path):
    from featpipe.data import open_index

    index = open_index(tiny_cache(tmp_path / "c.h5"))
    mode, fits = plan_fits(index, TuneOptions(cache=index.path))
    assert mode == "folds" and len(fits) == 3
    pool = set(index.rows("train")) | set(index.rows("val"))
    assert set(np.concatenate([va for _, va, _ in fits]).tolist()) == pool
    assert not set(np.concatenate([va for _, va, _ in fits]).tolist()) & set(index.rows("test")), "test never used"
    mode, fits = plan_fits(index, TuneOptions(cache=index.path, cv="seeds", seeds=2))
    assert mode == "seeds" and [s for _, _, s in fits] == [0, 1]


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"trials": 0}, "trials"),
        ({"jobs": 0}, "jobs"),
        ({"trials": None}, "trials"),
        ({"heads": ("cnn-lstm",)}, "heads"),
        ({"cv": "loo"}, "cv"),
        ({"time_budget": -1.0}, "time_budget"),
    ],
)
def test_bad_options_are_refused_naming_the_option(kwargs, flag):
    with pytest.raises(OptionError) as err:
        TuneOptions(**kwargs)
    assert err.value.option == flag


# ---------------------------------------------------------------- a search, resumed


def _finished(db: Path) -> list[int]:
    """Numbers of the COMPLETE trials in ``db``, read through SQLite read-only.

    Not through Optuna: opening a storage creates its tables, which raced the search creating the
    same file ("UNIQUE constraint failed: alembic_version", in the search or here).
    """
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
            rows = con.execute("SELECT number FROM trials WHERE state = 'COMPLETE'").fetchall()
    except sqlite3.OperationalError:  # no file, or no trials table yet: the search is creating them
        return []
    return sorted(int(n) for (n,) in rows)


def test_ctrl_c_keeps_finished_trials_and_the_same_command_resumes_then_retrains_the_best(tmp_path):
    cache = tiny_cache(tmp_path / "c.h5")
    out, models = tmp_path / "tune", tmp_path / "models"
    cmd = [
        sys.executable,
        "-m",
        "featpipe",
        "tune",
        str(cache),
        "--heads",
        "gru,segments",
        "--out",
        str(out),
        "--models-dir",
        str(models),
        "--epochs",
        "4",
        "--patience",
        "2",
    ]
    proc = subprocess.Popen(cmd + ["--trials", "500"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    db = out / "study.db"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if db.exists() and len(_finished(db)) >= 2:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "finished trials are kept" in err and "Traceback" not in err
    kept = _finished(db)
    assert len(kept) >= 2
    board = json.loads((out / "leaderboard.json").read_text())
    assert len(board["trials"]) == len(kept) and board["cv"] == "folds"
    assert not (models / "latest").exists(), "an interrupted search retrains nothing"

    target = len(kept) + 1
    done = subprocess.run(cmd + ["--trials", str(target)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    after = _finished(db)
    assert set(kept) <= set(after) and len(after) >= target, "earlier trials are kept, not redone"
    for name in ("leaderboard.txt", "leaderboard.csv", "leaderboard.json", "leaderboard.png", "best.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert "val acc (folds)" in done.stdout and "+-" in done.stdout
    rows = (out / "leaderboard.csv").read_text().splitlines()
    assert rows[0].startswith("rank,trial,mean_val_accuracy,std") and len(rows) == 1 + len(after)
    board = json.loads((out / "leaderboard.json").read_text())["trials"]
    assert all(r["mean"] == pytest.approx(np.mean(r["scores"])) and len(r["scores"]) == 3 for r in board)
    best = json.loads((out / "best.json").read_text())
    run = models / (models / "latest").read_text().strip()
    assert str(run) == best["run_dir"] and (run / "model.keras").is_file()
    info = json.loads((run / "run.json").read_text())
    assert info["config"]["rnn"] == best["best"]["params"]["rnn"]


# ---------------------------------------------------------------- quality on the hard sample set (issue 10)


@pytest.fixture(scope="module")
def hard_cache(tmp_path_factory) -> Path:
    """The hard preset with 20 train clips per class, through the small random backbone of the quality tests."""
    from featpipe.extract import extract
    from featpipe.sample_data import write_sample_data

    root = tmp_path_factory.mktemp("hard")
    write_sample_data(root / "data", train=20, val=6, test=16, difficulty="hard")
    out = root / "vgg16-64.h5"
    extract(data=root / "data", output=out, backbone="vgg16", size=64, weights="none", quiet=True)
    return out


@pytest.fixture(scope="module")
def hard_results(hard_cache, tmp_path_factory):
    from featpipe.baselines import linear_probe
    from featpipe.train import train

    runs = tmp_path_factory.mktemp("hard-runs")
    results = {
        head: train(cache=hard_cache, rnn=head, out=runs / head, quiet=True).metrics["test"]
        for head in ("gru", "lstm", "segments", "mean")
    }
    return {**results, "linear probe": linear_probe(hard_cache)}


@pytest.mark.parametrize("head", ["gru", "lstm"])
def test_default_recurrent_heads_learn_the_hard_set_from_20_clips_per_class_as_well_as_the_baselines(
    hard_results, head
):
    accuracy = hard_results[head]["accuracy"]
    assert accuracy >= 0.90, hard_results[head]["confusion_matrix"]
    best = max(hard_results[name]["accuracy"] for name in ("segments", "linear probe"))
    assert accuracy >= best - 0.03, {name: r["accuracy"] for name, r in hard_results.items()}


def test_the_order_blind_mean_head_stays_at_chance_inside_the_reversed_pairs_of_the_hard_set(hard_results):
    metrics = hard_results["mean"]
    cm, names = np.array(metrics["confusion_matrix"]), metrics["class_names"]
    for a, b in (("blue_to_red", "red_to_blue"), ("grow", "shrink")):
        idx = [names.index(a), names.index(b)]
        within = cm[np.ix_(idx, idx)]
        assert 0.2 <= np.trace(within) / within.sum() <= 0.8, (a, b, within)


def test_tunes_retrained_best_is_as_good_on_test_as_the_default_heads_it_searched_from(
    hard_cache, hard_results, tmp_path
):
    from featpipe.tune import tune

    # a short search (the three heads' defaults are its first trials, then two sampled ones) on the hard set
    result = tune(
        cache=hard_cache, trials=5, epochs=40, patience=8, out=tmp_path / "tune", models_dir=tmp_path, quiet=True
    )
    assert len(result.leaderboard) >= 5 and result.run_dir is not None
    defaults = max(hard_results[head]["accuracy"] for head in ("gru", "lstm"))
    assert result.test_accuracy >= defaults - 1.5 / 64, (result.best, result.test_accuracy, defaults)
