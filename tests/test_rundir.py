"""The run directory contract (featpipe.runs.rundir): every way a run can be wrong is one sentence, exit 2.

These runs are written by hand (no training): run.json and model.keras are checked before Keras
loads anything, so a fake model file is enough to reach every refusal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from featpipe.cli import app
from featpipe.errors import OptionError, RunError
from featpipe.runs.rundir import (
    RunInfo,
    check_destination,
    file_sha256,
    make_temp_dir,
    publish_run,
    read_run,
    resolve_run,
    write_run_file,
)

runner = CliRunner()

PRE = {
    "backbone": "vgg16",
    "weights": "none",
    "weights_fingerprint": "fp",
    "input_size": 32,
    "frames": 4,
    "sampling": "uniform",
    "weights_seed": 0,
}


def fake_run(path: Path, model: bytes = b"model one", **changes) -> Path:
    """A run directory whose run.json records the hash of ``model`` (written as model.keras)."""
    path.mkdir(parents=True)
    (path / "model.keras").write_bytes(model)
    info = RunInfo(
        class_names=("a", "b"),
        preprocessing=PRE,
        cache_attrs={},
        cache=str(path / "c.h5"),
        cache_fingerprint="0" * 16,
        head={"head": "gru"},
        config={},
        run_id="r" * 16,
        model_sha256=file_sha256(path / "model.keras"),
        train_clips=("a/1.mp4",),
        val_clips=(),
        run_format=2,
        **changes,
    )
    (path / "run.json").write_text(json.dumps(info.to_dict()))
    return path


def damage(kind: str, root: Path) -> Path:
    """A broken run (or models/latest) of the given kind; returns what to pass to the commands."""
    run = fake_run(root / "models" / "run")
    if kind == "invalid json":
        (run / "run.json").write_text('{"class_names": ["a", "b"], ')
    elif kind == "incomplete":
        data = json.loads((run / "run.json").read_text())
        del data["preprocessing"], data["cache"]
        (run / "run.json").write_text(json.dumps(data))
    elif kind == "not an object":
        (run / "run.json").write_text("[1, 2]")
    elif kind == "another run's model":
        (run / "model.keras").write_bytes(b"model two")
    elif kind == "no model":
        (run / "model.keras").unlink()
    elif kind == "garbage latest":
        (root / "models" / "latest").write_bytes(b"\x00\xff\xfegarbage\n\x01")
        return root / "models" / "latest"
    elif kind == "latest naming nothing":
        (root / "models" / "latest").write_text("deleted-run\n")
        return root / "models" / "latest"
    elif kind == "latest naming a path":
        (root / "models" / "latest").write_text("../../etc\n")
        return root / "models" / "latest"
    return run


KINDS = {
    "invalid json": "is not valid JSON",
    "incomplete": "is incomplete (no preprocessing, cache)",
    "not an object": "does not hold a JSON object",
    "another run's model": "is not the model this run's run.json describes",
    "no model": "has no model.keras",
    "garbage latest": "does not name a run",
    "latest naming nothing": "names 'deleted-run', which is not a run directory",
    "latest naming a path": "does not name a run",
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("command", ["evaluate", "predict", "info"])
def test_a_broken_run_is_one_sentence_for_every_command(tmp_path, kind, command):
    target = damage(kind, tmp_path)
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")
    args = {
        "evaluate": ["evaluate", str(target)],
        "info": ["info", str(target)],
        "predict": ["predict", str(clip), "--model", str(target)],
    }[command]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.output, result.stderr)
    assert "Traceback" not in result.output + result.stderr and isinstance(result.exception, SystemExit)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert KINDS[kind] in result.stderr


def test_a_run_is_read_as_a_typed_description(tmp_path):
    run = fake_run(tmp_path / "run")
    run_dir, info = read_run(run)
    assert run_dir == run and info.class_names == ("a", "b") and info.preprocessing["frames"] == 4
    assert info.train_clips == ("a/1.mp4",) and RunInfo.from_dict(info.to_dict()) == info


def test_a_run_json_of_the_previous_format_is_still_read(tmp_path):
    """Runs written before run identity have no run_id, model hash or clip lists: read, not checked."""
    run = fake_run(tmp_path / "run")
    data = json.loads((run / "run.json").read_text())
    for key in ("run_id", "model_sha256", "train_clips", "val_clips", "run_format"):
        del data[key]
    (run / "run.json").write_text(json.dumps(data))
    (run / "model.keras").write_bytes(b"anything")
    _, info = read_run(run)
    assert info.run_format == 1 and info.model_sha256 is None and info.train_clips is None
    result = runner.invoke(app, ["info", str(run)])
    assert result.exit_code == 0, result.stderr
    assert "not recorded" in result.output and "no longer there" in result.output


def test_models_latest_is_followed_and_a_missing_one_says_train_first(tmp_path):
    run = fake_run(tmp_path / "models" / "r1")
    (tmp_path / "models" / "latest").write_text("r1\n")
    assert resolve_run(tmp_path / "models" / "latest") == run
    with pytest.raises(RunError, match="no run has been trained here yet"):
        resolve_run(tmp_path / "elsewhere" / "latest")
    with pytest.raises(RunError, match="not a featpipe run directory"):
        resolve_run(tmp_path)


def test_publishing_replaces_an_old_run_whole_and_then_points_latest_at_it(tmp_path):
    old = fake_run(tmp_path / "models" / "run", b"old")
    (old / "old-only.txt").write_text("x")
    (tmp_path / "models" / "latest").write_text("other\n")
    with pytest.raises(OptionError, match="force=True"):
        check_destination(old, force=False)
    tmp = make_temp_dir(old)
    assert tmp.parent == old.parent and tmp.name.startswith(".run.")
    (tmp / "model.keras").write_bytes(b"new")
    info = RunInfo(
        class_names=("a", "b"),
        preprocessing=PRE,
        cache_attrs={},
        cache="c",
        cache_fingerprint="f",
        head={},
        config={},
        model_sha256=file_sha256(tmp / "model.keras"),
    )
    write_run_file(tmp, info)
    publish_run(tmp, old, force=True)
    assert sorted(p.name for p in old.iterdir()) == ["model.keras", "run.json"], "no old file mixed in"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["latest", "run"], "nothing left aside"
    assert (tmp_path / "models" / "latest").read_text() == "run\n"
    assert read_run(old)[1].model_sha256 == file_sha256(old / "model.keras")


def test_force_never_replaces_a_folder_that_is_not_a_run(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(OptionError, match="not a run directory"):
        check_destination(mine, force=True)
    check_destination(tmp_path / "new", force=False)  # a new folder, or an empty one, is fine
    (tmp_path / "empty").mkdir()
    check_destination(tmp_path / "empty", force=False)


def test_leftovers_of_killed_trains_are_cleaned_up_and_an_old_run_set_aside_comes_back(tmp_path):
    import socket

    host = socket.gethostname()
    stale = tmp_path / f".run.featpipe-tmp-{host}-999999999"  # no such process
    stale.mkdir()
    (stale / "history.csv").write_text("epoch\n")
    aside = fake_run(tmp_path / f".old-run.featpipe-old-{host}-999999999")  # killed between the two renames
    elsewhere = tmp_path / ".run.featpipe-tmp-another-host-1"  # maybe alive on another machine: left alone
    elsewhere.mkdir()
    tmp = make_temp_dir(tmp_path / "run")
    assert not stale.exists() and tmp.is_dir() and elsewhere.is_dir()
    assert not aside.exists() and read_run(tmp_path / "old-run")[1].class_names == ("a", "b")
