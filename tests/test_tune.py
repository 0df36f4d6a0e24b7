"""featpipe tune: stratified folds, the search's outputs, resuming after Ctrl-C; and the quality claims
of issue 10 on the hard sample set (default gru/lstm vs segments and the linear probe, mean at chance)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from caches import tiny_cache
from featpipe.cache.schema import CacheConfig, ClipRecord
from featpipe.cache.writer import CacheWriter
from featpipe.training.search import TuneOptions

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


@pytest.mark.slow
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
    assert "trials finished / failed / pruned" in (out / "report.html").read_text(), "a stopped search has its page"
    assert not (models / "latest").exists(), "an interrupted search retrains nothing"

    target = len(kept) + 1
    done = subprocess.run(cmd + ["--trials", str(target)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    after = _finished(db)
    assert set(kept) <= set(after) and len(after) >= target, "earlier trials are kept, not redone"
    outputs = ("leaderboard.txt", "leaderboard.csv", "leaderboard.json", "leaderboard.png", "best.json", "report.html")
    for name in outputs:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert "val acc (folds)" in done.stdout and "+-" in done.stdout
    assert f"Report: {out / 'report.html'}" in done.stdout
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
    from featpipe.extraction.extract import extract
    from featpipe.video.sample_data import write_sample_data

    root = tmp_path_factory.mktemp("hard")
    write_sample_data(root / "data", train=20, val=6, test=16, difficulty="hard")
    out = root / "vgg16-64.h5"
    extract(data=root / "data", output=out, backbone="vgg16", size=64, weights="none", quiet=True)
    return out


@pytest.fixture(scope="module")
def hard_results(hard_cache, tmp_path_factory):
    from featpipe.training.baselines import linear_probe
    from featpipe.training.train import train

    runs = tmp_path_factory.mktemp("hard-runs")
    results = {
        head: train(cache=hard_cache, rnn=head, out=runs / head, quiet=True).metrics["test"]
        for head in ("gru", "lstm", "segments", "mean")
    }
    return {**results, "linear probe": linear_probe(hard_cache)}


@pytest.mark.slow
@pytest.mark.parametrize("head", ["gru", "lstm"])
def test_default_recurrent_heads_learn_the_hard_set_from_20_clips_per_class_as_well_as_the_baselines(
    hard_results, head
):
    accuracy = hard_results[head]["accuracy"]
    assert accuracy >= 0.90, hard_results[head]["confusion_matrix"]
    best = max(hard_results[name]["accuracy"] for name in ("segments", "linear probe"))
    assert accuracy >= best - 0.03, {name: r["accuracy"] for name, r in hard_results.items()}


@pytest.mark.slow
def test_the_order_blind_mean_head_stays_at_chance_inside_the_reversed_pairs_of_the_hard_set(hard_results):
    metrics = hard_results["mean"]
    cm, names = np.array(metrics["confusion_matrix"]), metrics["class_names"]
    for a, b in (("blue_to_red", "red_to_blue"), ("grow", "shrink")):
        idx = [names.index(a), names.index(b)]
        within = cm[np.ix_(idx, idx)]
        assert 0.2 <= np.trace(within) / within.sum() <= 0.8, (a, b, within)


@pytest.mark.slow
def test_tunes_retrained_best_is_as_good_on_test_as_the_default_heads_it_searched_from(
    hard_cache, hard_results, tmp_path
):
    from featpipe.training.tune import tune

    # a short search (the three heads' defaults are its first trials, then two sampled ones) on the hard set
    result = tune(
        cache=hard_cache, trials=5, epochs=40, patience=8, out=tmp_path / "tune", models_dir=tmp_path, quiet=True
    )
    assert len(result.leaderboard) >= 5 and result.run_dir is not None
    defaults = max(hard_results[head]["accuracy"] for head in ("gru", "lstm"))
    assert result.test_accuracy >= defaults - 1.5 / 64, (result.best, result.test_accuracy, defaults)


# ---------------------------------------------------------------- hard to break (issue 19): checks before the search

from typer.testing import CliRunner  # noqa: E402

from featpipe.cli import app  # noqa: E402
from mounts import fill, read_only, tmpfs  # noqa: E402

runner = CliRunner()
FAST_TUNE = ["--heads", "segments,mean", "--trials", "2", "--epochs", "2", "--patience", "1"]


def _tune(cache: Path, out: Path, models: Path, *extra: str):
    args = ["tune", str(cache), *FAST_TUNE, "--out", str(out), "--models-dir", str(models), *extra]
    result = runner.invoke(app, args)
    assert "Traceback" not in result.output + result.stderr, result.output + result.stderr
    return result


def _damage_row(cache: Path, row: int) -> str:
    """Flip one byte of the stored features of ``row`` (in the cache file or its part files); its clip's name."""
    import h5py

    with h5py.File(cache, "r") as f:
        target = np.asarray(f["features"][row][0]).tobytes()
        video = f["video"].asstr()[row]
    files = [cache, *sorted(Path(str(cache) + ".parts").glob("*"))] if Path(str(cache) + ".parts").is_dir() else [cache]
    for path in files:
        raw = bytearray(path.read_bytes())
        at = raw.find(target)
        if at >= 0:
            raw[at + 1] ^= 0x40
            path.write_bytes(bytes(raw))
            return video
    raise AssertionError("the row's bytes were not found")


def _bad_cache(path: Path, kind: str) -> tuple[Path, str]:
    """A small cache with one flaw: NaN or infinite features in one clip, a damaged row, a train split of one class."""
    if kind == "damaged":
        tiny_cache(path)
        return path, _damage_row(path, 5)
    t, d = 4, 6
    names = ("a", "b", "c", "d")
    w = CacheWriter(path, CacheConfig("vgg16", "none", "fp", 32, t, "uniform", "float32", (d,), names))
    for i in range(24):
        label = i % 4
        split = "test" if i % 8 == 7 else ("val" if i % 6 == 0 else "train")
        if kind == "one class":
            label = 2 if split == "train" else label
        feats = np.full((t, d), float(label), np.float32)
        if i == 9 and kind in ("nan", "inf"):
            feats[1, 2] = np.nan if kind == "nan" else np.inf
        w.append(ClipRecord(f"v{i:03d}.mp4", label, split, t, feats, np.ones(t, bool)))
    w.finalize()
    return path, {"nan": "v009.mp4", "inf": "v009.mp4", "one class": "'c'"}[kind]


@pytest.mark.parametrize("kind, status", [("nan", 2), ("inf", 2), ("damaged", 1), ("one class", 2)])
def test_a_flawed_cache_is_refused_before_the_search_as_train_refuses_it(tmp_path, kind, status):
    cache, named = _bad_cache(tmp_path / "c.h5", kind)
    result = _tune(cache, tmp_path / "tune", tmp_path / "models")
    assert result.exit_code == status, result.output + result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and named in result.stderr
    assert not (tmp_path / "tune" / "study.db").exists(), "no trial was started"
    train = runner.invoke(app, ["train", "--cache", str(cache), "--epochs", "1", "-q", "--out", str(tmp_path / "r")])
    assert train.exit_code == status, "the same exit status as train for the same cache"


def test_a_damaged_study_db_is_one_sentence_naming_it(tmp_path):
    cache = tiny_cache(tmp_path / "c.h5")
    out = tmp_path / "tune"
    out.mkdir()
    for content in (b"\x00garbage" * 900, b"SQLite format 3\x00" + bytes(range(256)) * 40):
        (out / "study.db").write_bytes(content)
        result = _tune(cache, out, tmp_path / "models")
        assert result.exit_code == 2, result.output + result.stderr
        assert "study.db' is damaged" in result.stderr and "move it away" in result.stderr
        assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("where", ["out", "models"])
def test_a_read_only_out_or_models_folder_is_one_sentence_before_the_search(tmp_path, where):
    cache = tiny_cache(tmp_path / "c.h5")
    with tmpfs(tmp_path / "media", "1m") as media:
        (media / "folder").mkdir()
        with read_only(media):
            out = media / "folder" if where == "out" else tmp_path / "tune"
            models = media / "folder" if where == "models" else tmp_path / "models"
            result = _tune(cache, out, models)
    assert result.exit_code == 2, result.output + result.stderr
    flag = "--out" if where == "out" else "--models-dir"
    assert result.stderr.startswith(f"error: {flag} ") and "not writable" in result.stderr
    assert not (tmp_path / "tune" / "study.db").exists(), "no trial was started"


def test_a_full_disk_under_the_study_is_one_sentence_with_status_1(tmp_path):
    cache = tiny_cache(tmp_path / "c.h5")
    with tmpfs(tmp_path / "disk", "1m") as disk:
        fill(disk, leave=8 << 10)
        result = _tune(cache, disk / "tune", tmp_path / "models")
    assert result.exit_code == 1, result.output + result.stderr
    assert "disk is full" in result.stderr and "run the same command again" in result.stderr
    assert result.stderr.count("\n") == 1


def test_a_second_tune_on_the_same_study_is_refused_while_one_runs(tmp_path):
    from featpipe.training.workers import FolderLock

    cache = tiny_cache(tmp_path / "c.h5")
    out = tmp_path / "tune"
    out.mkdir()
    with FolderLock(out, "study", "`featpipe tune`"):  # what a running tune holds
        result = _tune(cache, out, tmp_path / "models", "--no-retrain")
    assert result.exit_code == 2, result.output + result.stderr
    assert f"Another `featpipe tune` (process {os.getpid()}) is running in '{out}'" in result.stderr


def test_tune_waits_for_workers_of_a_killed_run_and_refuses_while_they_live(tmp_path, monkeypatch):
    import fcntl

    from featpipe.training import workers

    cache = tiny_cache(tmp_path / "c.h5")
    out = tmp_path / "tune"
    out.mkdir()
    monkeypatch.setattr(workers, "ORPHAN_WAIT", 0.5)
    fd = os.open(out / "study.workers.lock", os.O_RDWR | os.O_CREAT)  # what a worker of a killed tune holds
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        result = _tune(cache, out, tmp_path / "models", "--no-retrain")
    finally:
        os.close(fd)
    assert result.exit_code == 2, result.output + result.stderr
    assert "Worker processes of an earlier `featpipe tune`" in result.stderr and "still running" in result.stderr
    assert not (out / "study.db").exists(), "nothing was written while they run"


# ---------------------------------------------------------------- interrupted searches resume whole (issue 19)


def _trial_states(db: Path) -> dict[str, int]:
    import sqlite3

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
        return dict(con.execute("SELECT state, COUNT(*) FROM trials GROUP BY state").fetchall())


def _scored_defaults(db: Path, heads, frames: int) -> set[str]:
    """The heads whose default configuration (train's defaults) has a finished trial in ``db``."""
    import sqlite3

    from featpipe.training.search import defaults_as_trial

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
        ids = [i for (i,) in con.execute("SELECT trial_id FROM trials WHERE state = 'COMPLETE'")]
        scored = set()
        for i in ids:
            rows = con.execute(
                "SELECT param_name, param_value, distribution_json FROM trial_params WHERE trial_id = ?", (i,)
            )
            params = {}
            for name, value, dist in rows:
                dist = json.loads(dist)
                if dist["name"] == "CategoricalDistribution":
                    value = dist["attributes"]["choices"][int(value)]
                elif dist["name"] == "IntDistribution":
                    value = int(value)
                params[name] = value
            scored |= {h for h in heads if defaults_as_trial(h, frames) == params}
    return scored


@pytest.mark.slow
def test_a_trial_left_running_by_a_killed_search_is_failed_and_its_default_scored_on_resume(tmp_path):
    import optuna

    from featpipe.training.inputs import open_index
    from featpipe.training.search import defaults_as_trial, suggest
    from featpipe.training.study import load_study, study_name
    from featpipe.training.tune import tune

    cache = tiny_cache(tmp_path / "c.h5")
    out = tmp_path / "tune"
    out.mkdir()
    heads = ("segments", "mean")
    opts = TuneOptions(cache=cache, heads=heads, trials=2, epochs=2, patience=1, out=out, retrain=False, quiet=True)
    index = open_index(cache)
    # what a search killed during its first trial leaves: both defaults queued, the first one RUNNING for ever,
    # and (a second worker's) the other default and one sampled trial finished: --trials 2 is reached
    study = load_study(out / "study.db", study_name(index, opts, "folds"), 0)
    for head in heads:
        study.enqueue_trial(defaults_as_trial(head, index.config.frames))
    killed = study.ask()
    for value in (0.5, 0.4):
        trial = study.ask()
        params = suggest(trial, heads, index.config.frames)
        trial.set_user_attr("params", params)
        trial.set_user_attr("scores", [value] * 3)
        study.tell(trial, value)
    assert study.trials[killed.number].state == optuna.trial.TrialState.RUNNING
    assert _scored_defaults(out / "study.db", heads, index.config.frames) == {"mean"}

    result = tune(opts)
    states = _trial_states(out / "study.db")
    assert "RUNNING" not in states and states["FAIL"] == 1, states
    assert _scored_defaults(out / "study.db", heads, index.config.frames) == set(heads), "every default is scored"
    assert len(result.leaderboard) == states["COMPLETE"] == 3


def _processes_of_run(marker: str) -> list:
    """Every live process (not a zombie) whose environment carries ``FEATPIPE_TEST_RUN=marker``: one run's
    command and everything it started, found even after they were re-parented."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("FEATPIPE_TEST_RUN") == marker and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            pass
    return found


def _workers_of(proc: subprocess.Popen) -> list:
    import psutil

    try:
        return [p for p in psutil.Process(proc.pid).children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
    except psutil.Error:
        return []


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (Linux: the SigCgt mask in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(mask >> (signal.SIGTERM - 1) & 1)


@pytest.mark.slow
def test_tune_stopped_by_sigint_sigterm_and_sigkill_at_random_moments_resumes_to_a_whole_leaderboard(tmp_path):
    """Issue 19's done-when: each signal at two random moments (one while the search starts, one while a worker
    runs), then the same command: every default scored, no trial left running, the leaderboard written, and no
    process of an interrupted run left alive."""
    import random

    cache = tiny_cache(tmp_path / "c.h5")
    out, models = tmp_path / "tune", tmp_path / "models"
    cmd = [sys.executable, "-m", "featpipe", "tune", str(cache), *FAST_TUNE, "--out", str(out)]
    cmd += ["--models-dir", str(models), "--no-retrain"]  # (train's tests cover a stopped retrain)
    endless = ["--trials", "500"]  # the interrupted runs: their workers never end on their own
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    # (signal, moment, to the whole process group as a terminal's Ctrl-C does)
    plan = [
        (signal.SIGINT, "start", False),
        (signal.SIGTERM, "start", False),
        (signal.SIGKILL, "start", False),
        (signal.SIGINT, "worker", True),
        (signal.SIGTERM, "worker", False),
        (signal.SIGKILL, "worker", False),
    ]
    rng.shuffle(plan)
    expected = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -signal.SIGKILL}
    for sig, moment, group in plan:
        where = f"seed {seed}: {sig.name} at {moment}"
        marker = f"{seed}-{sig.name}-{moment}"
        env = {**os.environ, "FEATPIPE_TEST_RUN": marker}
        proc = subprocess.Popen(
            cmd + endless, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env
        )
        if moment == "start":  # once featpipe handles signals (before, the process just dies: nothing started)
            deadline = time.monotonic() + 120
            while proc.poll() is None and not _catches_sigterm(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 2.5))
        else:
            deadline = time.monotonic() + 240
            while proc.poll() is None and not _workers_of(proc) and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(rng.uniform(0.0, 5.0))
        if proc.poll() is None:
            (os.killpg if group else os.kill)(proc.pid, sig)
        proc.wait(timeout=180)  # (not communicate: a surviving worker would hold its stderr open)
        deadline = time.monotonic() + 30  # (workers stop at once; this only bounds the wait)
        while _processes_of_run(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        alive = _processes_of_run(marker)
        for p in alive:  # (what the test started: stopped before the assertion reports it)
            p.kill()
        _, err = proc.communicate(timeout=60)
        assert not alive, (where, "processes of the stopped run are still running")
        assert "Traceback" not in err, (where, err)
        if proc.returncode != 0:  # (0: that run ended before the signal came)
            assert proc.returncode == expected[sig], (where, proc.returncode, err)
            if sig != signal.SIGKILL:
                assert "interrupted: finished trials are kept" in err, (where, err)

    done = subprocess.run(cmd + ["--trials", "3"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (seed, done.stderr)
    db = out / "study.db"
    states = _trial_states(db)
    assert "RUNNING" not in states and "WAITING" not in states and states["COMPLETE"] >= 3, (seed, states)
    assert _scored_defaults(db, ("segments", "mean"), 4) == {"segments", "mean"}, seed
    board = json.loads((out / "leaderboard.json").read_text())["trials"]
    assert len(board) == states["COMPLETE"], seed
    assert (out / "leaderboard.csv").read_text().count("\n") == 1 + len(board), seed
