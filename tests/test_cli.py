"""The command line: help texts, exit statuses, one-sentence errors and no tracebacks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer

import featpipe
from cli_args import SMALL, python_m, runner
from cli_args import cli as run
from featpipe.cli import app
from featpipe.runtime.keras_import import _filtered_stderr, is_noise
from permissions import ordinary_user
from videos import write_text_as_video, write_video, write_zero_byte


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli") / "data"
    result = runner.invoke(app, ["sample-data", str(root), "--train", "2", "--val", "1", "--test", "1"])
    assert result.exit_code == 0, result.output
    assert "16 clips" in result.output
    return root


@pytest.mark.parametrize("command", [[], ["sample-data"], ["extract"], ["merge"], ["info"]])
def test_every_command_explains_its_options(command):
    result = run(*command, "--help")
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_extract_help_documents_the_main_options():
    out = run("extract", "--help").output
    for option in (
        "--backbone",
        "--data",
        "--csv",
        "--frames",
        "--sampling",
        "--size",
        "--weights",
        "--batch-size",
        "--workers",
        "--dtype",
        "--output",
        "--strict",
        "--quiet",
        "--retry-failed",
        "--shard",
        "--precision",
    ):
        assert option in out


def test_python_dash_m_featpipe_works():
    proc = subprocess.run([sys.executable, "-m", "featpipe", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("featpipe ")


def test_extract_prints_a_summary_and_a_progress_bar_with_rates(sample, tmp_path):
    out = tmp_path / "c.h5"
    result = run("extract", "--data", str(sample), "--output", str(out), *SMALL)
    assert result.exit_code == 0, result.output
    assert "Extracted 16 clips" in result.output
    assert "frames/s" in result.stderr and "clip" in result.stderr  # tqdm bar
    assert "blue_to_red" in result.output and "0 failed" in result.output
    info = run("info", str(out))
    assert info.exit_code == 0 and "16 clips" in info.output


def test_quiet_silences_the_progress_bar(sample, tmp_path):
    result = run("extract", "--data", str(sample), "--output", str(tmp_path / "c.h5"), *SMALL, "--quiet")
    assert result.exit_code == 0
    assert "frames/s]" not in result.stderr and "%|" not in result.stderr


def test_missing_data_folder_is_exit_2_with_a_sentence(tmp_path):
    result = run("extract", "--data", str(tmp_path / "nowhere"), *SMALL)
    assert result.exit_code == 2
    assert "does not exist" in result.stderr and "sample-data" in result.stderr


def test_empty_dataset_is_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run("extract", "--data", str(tmp_path / "empty"), *SMALL)
    assert result.exit_code == 2 and "error:" in result.stderr


def test_single_class_is_exit_2(tmp_path):
    write_video(tmp_path / "d" / "only" / "a.mp4", 5, 32, 32)
    result = run("extract", "--data", str(tmp_path / "d"), *SMALL)
    assert result.exit_code == 2 and "two classes" in result.stderr


def test_unknown_backbone_is_exit_2(sample):
    result = run("extract", "--data", str(sample), "--backbone", "alexnet")
    assert result.exit_code == 2 and "alexnet" in result.output + result.stderr


def test_bad_files_still_exit_0_but_strict_exits_1(tmp_path):
    data = tmp_path / "d"
    write_video(data / "a" / "ok.mp4", 10, 48, 48)
    write_video(data / "b" / "ok.mp4", 10, 48, 48)
    write_zero_byte(data / "b" / "empty.mp4")
    out = tmp_path / "c.h5"
    result = run("extract", "--data", str(data), "--output", str(out), *SMALL, "--quiet")
    assert result.exit_code == 0
    assert "failed: " in result.output and "empty.mp4" in result.output
    strict = run("extract", "--data", str(data), "--output", str(tmp_path / "s.h5"), *SMALL, "--quiet", "--strict")
    assert strict.exit_code == 1 and "--strict" in strict.stderr


def test_no_usable_clip_exits_1(tmp_path):
    data = tmp_path / "d"
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
        write_text_as_video(data / cls / "x.mp4")
    result = run("extract", "--data", str(data), "--output", str(tmp_path / "c.h5"), *SMALL, "--quiet")
    assert result.exit_code == 1 and "No clip could be used" in result.stderr


def test_info_on_a_missing_or_foreign_file_is_exit_2(tmp_path):
    assert run("info", str(tmp_path / "x.h5")).exit_code == 2
    (tmp_path / "y.h5").write_text("hello")
    result = run("info", str(tmp_path / "y.h5"))
    assert result.exit_code == 2 and "HDF5" in result.stderr


def test_sample_data_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("do not delete")
    result = run("sample-data", str(tmp_path / "mine"))
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert (tmp_path / "mine" / "thesis.txt").exists()


@pytest.mark.slow
def test_shards_merge_into_a_cache_that_trains_and_evaluates(sample, tmp_path):
    cache = tmp_path / "cache"
    merged = cache / "vgg16.h5"
    for i in (1, 2):
        result = run(
            "extract", "--data", str(sample), "--cache-dir", str(cache), *SMALL, "--quiet", "--shard", f"{i}/2"
        )
        assert result.exit_code == 0, result.output
        assert f"vgg16.shard-{i}-of-2.h5" in result.stdout and f"featpipe merge --output {merged}" in result.stdout
    models = ["--models-dir", str(tmp_path / "models"), "--epochs", "2", "--patience", "2", "--quiet"]
    early = run("train", "--cache-dir", str(cache), *models)
    assert early.exit_code == 2
    assert "holds only shards" in early.stderr and f"featpipe merge --output {merged}" in early.stderr
    result = run("merge", "--output", str(merged))
    assert result.exit_code == 0, result.output
    assert "Merged 2 shards" in result.stdout and "16 clips" in result.stdout
    trained = run("train", "--cache-dir", str(cache), *models)  # the shards beside the merged cache do not count
    assert trained.exit_code == 0, trained.output
    assert "test accuracy" in trained.stdout
    evaluated = run("evaluate", str(tmp_path / "models" / "latest"), "--json")
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert metrics["n"] == 4 and Path(metrics["cache"]).resolve() == merged.resolve()


@pytest.mark.parametrize("spec", ["0/2", "3/2", "half"])
def test_a_bad_shard_is_exit_2_with_a_sentence(sample, tmp_path, spec):
    result = run("extract", "--data", str(sample), "--output", str(tmp_path / "c.h5"), *SMALL, "--shard", spec)
    assert result.exit_code == 2
    assert "--shard must look like I/N with 1 <= I <= N, e.g. 2/4" in result.stderr
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- help at 80 columns

GROUP = typer.main.get_command(app)


def lines_spanned(lines: list[str], text: str) -> int | None:
    """How many consecutive lines of ``lines`` it takes to read ``text`` whole (line breaks and indents ignored)."""
    target = "".join(text.split())
    for n in range(1, len(lines) + 1):
        for i in range(len(lines) - n + 1):
            if target in "".join("".join(lines[i : i + n]).split()):
                return n
    return None


@pytest.mark.parametrize("command", ["", *GROUP.commands])
def test_help_fits_80_columns_and_every_description_reads_whole(command):
    """No line over 80 columns, no description cut off, eaten ([default: ...]) or chopped into 20-column shreds."""
    args = [command, "--help"] if command else ["--help"]
    result = runner.invoke(app, args, env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80, "\n".join(line for line in lines if len(line) > 80)
    params = (GROUP.commands[command] if command else GROUP).params
    helps = [p.help for p in params if getattr(p, "help", None)]
    assert len(helps) >= 1
    for text in helps:
        n = lines_spanned(lines, text)
        assert n is not None, f"description not shown whole: {text!r}\n{result.output}"
        assert n <= len(text) // 40 + 2, f"{text!r} is wrapped into {n} lines:\n{result.output}"


def test_the_backbone_choices_are_listed_in_words_that_wrap():
    out = runner.invoke(app, ["extract", "--help"], env={"COLUMNS": "80"}, terminal_width=80).output
    flat = " ".join(out.split())
    assert "inceptionv3, efficientnetb0" in flat and "resnet50; or raw" in flat


# ---------------------------------------------------------------------------- a quiet CLI


@pytest.fixture(scope="module")
def tiny_run(sample, tmp_path_factory) -> Path:
    """The smallest trained run: vgg16 at 32 px, 8 frames, random weights, 2 epochs."""
    root = tmp_path_factory.mktemp("quiet")
    ex = featpipe.extract(
        data=sample, output=root / "c.h5", backbone="vgg16", size=32, frames=8, weights="none", quiet=True
    )
    return featpipe.train(
        cache=ex.cache, rnn="gru", models_dir=root / "models", epochs=2, patience=2, quiet=True
    ).run_dir


def featpipe_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    """`python -m featpipe ARGS` in a fresh process, as a user runs it (TF_CPP_MIN_LOG_LEVEL=2 is inherited)."""
    environ = {k: v for k, v in os.environ.items() if k != "FEATPIPE_VERBOSE"}
    proc = subprocess.run(python_m(*args), capture_output=True, text=True, timeout=300, env={**environ, **env})
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.slow
def test_evaluate_and_predict_print_nothing_on_stderr(tiny_run, sample):
    """TensorFlow's absl / oneDNN / cuda-driver / cuInit / DT_BOOL lines are hidden by default."""
    evaluated = featpipe_cli("evaluate", str(tiny_run), "--split", "test")
    assert "accuracy" in evaluated.stdout
    assert evaluated.stderr == ""
    clip = sample / "test" / "grow" / "grow_test_000.mp4"
    predicted = featpipe_cli("predict", str(clip), "--model", str(tiny_run))
    assert "grow_test_000.mp4" in predicted.stdout
    assert predicted.stderr == ""


def test_help_loads_no_model_or_optional_library():
    """`featpipe --help` (and every command's) stays quick: Keras, TensorFlow, OpenCV, scikit-learn,
    matplotlib, Optuna and Ray are imported by the commands that use them, never at start-up."""
    heavy = ("keras", "tensorflow", "cv2", "sklearn", "matplotlib", "optuna", "ray", "torch", "jax")
    code = (
        "import sys\nfrom featpipe.cli import app\n"
        "for args in (['--help'], ['extract', '--help'], ['train', '--help'], ['tune', '--help']):\n"
        "    try:\n        app(args)\n    except SystemExit:\n        pass\n"
        f"print('loaded:', ','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.splitlines()[-1] == "loaded: "


def test_verbose_lets_tensorflows_lines_through_and_still_runs(tiny_run):
    """Which lines TensorFlow prints depends on the machine, so only the run itself is checked."""
    proc = featpipe_cli("--verbose", "evaluate", str(tiny_run), "--json")
    assert json.loads(proc.stdout.splitlines()[-1])["n"] == 4
    assert "Traceback" not in proc.stderr


def test_the_stderr_filter_drops_tensorflows_start_up_lines_and_keeps_everything_else(capfd):
    """What the import of TensorFlow writes to file descriptor 2 is replayed without the known noise."""
    noise = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1795462025.088793    4731 port.cc:153] oneDNN custom operations are on. You may see ...",
        "I0000 00:00:1795462025.089918    4731 cudart_stub.cc:31] Could not find cuda drivers on your machine.",
        "E0000 00:00:1795462030.644867    4731 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)",
    ]
    kept = ["E0000 00:00:1795462030.644867    4731 some_op.cc:52] a real error", "UserWarning: something to read"]
    assert all(is_noise(line) for line in noise) and not any(is_noise(line) for line in kept)
    capfd.readouterr()
    with _filtered_stderr():
        os.write(2, "\n".join(noise[:2] + kept[:1] + noise[2:] + kept[1:]).encode() + b"\n")
    assert capfd.readouterr().err.splitlines() == kept


# ---------------------------------------------------------------------------- the version, defined once


def test_the_version_is_defined_once_and_pyproject_reads_it():
    from setuptools.config.pyprojecttoml import read_configuration

    project = read_configuration(Path(__file__).resolve().parents[1] / "pyproject.toml", expand=True)["project"]
    assert "version" in project["dynamic"] and project["version"] == featpipe.__version__


def test_head_is_the_documented_flag_and_rnn_still_works_without_a_note(tmp_path):
    assert "--head" in run("train", "--help").output
    for flag in ("--head", "--rnn"):
        result = run("train", flag, "mean", "--cache", str(tmp_path / "missing.h5"))
        assert result.exit_code == 2 and "note:" not in result.stderr and "missing.h5" in result.stderr, result.stderr
    refused = run("train", "--rnn", "no-such-head")
    assert refused.exit_code == 2 and "cnn-lstm" in refused.output


def test_the_older_rnn_is_hidden_from_help():
    assert "--rnn" not in run("train", "--help").output


def test_the_python_api_takes_head_and_the_older_rnn():
    assert featpipe.TrainOptions(rnn="lstm").head == "lstm"
    assert featpipe.TrainOptions(head="segments").head == "segments"


# ---------------------------------------------------------------------------- permissions, as a user meets them
# Root reads everything whatever its mode: these run featpipe in a subprocess without that override
# (tests/permissions.py), so chmod denies what it denies a user.


def _unreadable_tree(root: Path) -> dict[str, Path]:
    """Under ``root``: a clip without read permission, a folder without any, and one that can be listed
    but not entered (read, no execute permission), each holding a clip."""
    denied_clip = root / "denied.mp4"
    shutil.copy(next(p for p in sorted(root.rglob("*.mp4"))), denied_clip)
    closed, unentered = root / "closed", root / "unentered"
    for folder in (closed, unentered):
        folder.mkdir()
        shutil.copy(denied_clip, folder / "inside.mp4")
    denied_clip.chmod(0)
    closed.chmod(0)
    unentered.chmod(0o644)
    return {"clip": denied_clip, "closed": closed, "unentered": unentered}


def as_user(prefix: list[str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, *python_m(*args)], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_extract_reports_what_an_ordinary_user_may_not_read_and_goes_on(sample, tmp_path):
    prefix = ordinary_user(tmp_path)
    data = tmp_path / "data"
    shutil.copytree(sample, data)
    denied = _unreadable_tree(data / "train" / "grow")
    raw = ["--backbone", "raw", "--size", "8", "--frames", "4"]  # no network to build: the subprocess is mostly Keras
    done = as_user(prefix, "extract", "--data", str(data), "--output", str(tmp_path / "c.h5"), *raw, "--quiet")
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr  # as for a bad clip: the others are extracted, the problem listed
    [failed] = [line for line in done.stdout.splitlines() if "denied.mp4" in line]
    assert "failed: train/grow/denied.mp4: " in failed and "permission denied" in failed.split("denied.mp4:", 1)[1]
    for folder in (denied["closed"], denied["unentered"]):
        [line] = [line for line in done.stdout.splitlines() if f"'{folder}'" in line]
        assert line.startswith("warning: ") and "permission denied" in line and "clips were not indexed" in line
    assert ": 16 clips, 64 real frames, 1 failed" in done.stdout  # the 16 sample clips are all in


@pytest.mark.slow
def test_predict_dir_reports_what_an_ordinary_user_may_not_read_in_it(tiny_run, sample, tmp_path):
    prefix = ordinary_user(tmp_path)
    clips = tmp_path / "clips"
    shutil.copytree(sample / "test", clips)  # 4 clips in 4 class folders
    denied = _unreadable_tree(clips / "grow")
    alone = tmp_path / "alone.mp4"  # named on the command line: reported with the others, not refused alone
    shutil.copy(sample / "test" / "grow" / "grow_test_000.mp4", alone)
    alone.chmod(0)
    done = as_user(prefix, "predict", str(clips), str(alone), "--model", str(tiny_run), "--json")
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1, done.stderr
    rows = {Path(row["clip"]): row for row in map(json.loads, done.stdout.splitlines())}
    assert sum("top" in row for row in rows.values()) == 4
    assert "permission denied" in rows[denied["clip"]]["error"] and "permission denied" in rows[alone]["error"]
    for folder in ("closed", "unentered"):
        error = rows[denied[folder]]["error"]
        assert "permission denied" in error and "clips were not indexed" in error
    assert f"Found 5 clips in '{clips}'." in done.stderr
    assert "2 of 6 clips could not be classified. 2 folders could not be read" in done.stderr


def test_an_unreadable_folder_is_a_warning_and_strict_makes_it_exit_1(tmp_path, monkeypatch):
    """Like a failed clip: listed, the rest extracted, status 0; --strict: status 1, the cache still written.
    (Denied by fault injection; the test above meets real permissions.)"""
    data = tmp_path / "d"
    for rel in ("a/ok.mp4", "b/ok.mp4", "b/locked/x.mp4"):
        write_video(data / rel, 6, 16, 16)
    denied = data / "b" / "locked"
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(os.fsdecode(path)) == denied:
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    raw = ["--backbone", "raw", "--size", "8", "--frames", "4", "--quiet"]
    result = run("extract", "--data", str(data), "--output", str(tmp_path / "c.h5"), *raw)
    assert result.exit_code == 0 and ": 2 clips" in result.output
    warning = f"warning: cannot read the folder '{denied}' (permission denied): its clips were not indexed"
    assert warning in result.output
    strict = run("extract", "--data", str(data), "--output", str(tmp_path / "s.h5"), *raw, "--strict")
    assert strict.exit_code == 1 and (tmp_path / "s.h5").is_file()
    refusal = f"1 folder(s) could not be read and --strict was given (first: '{denied}', permission denied)"
    assert refusal in strict.stderr


# ---------------------------------------------------------------------------- one name for the cache


@pytest.mark.parametrize("command", ["train", "tune"])
@pytest.mark.parametrize("spelling", ["positional", "--cache", "both"])
def test_train_and_tune_take_the_cache_as_cache_or_as_dash_dash_cache(tmp_path, command, spelling):
    missing = str(tmp_path / "missing.h5")
    args = {"positional": [missing], "--cache": ["--cache", missing], "both": [missing, "--cache", missing]}[spelling]
    result = run(command, *args)
    assert result.exit_code == 2 and f"Cache file '{missing}' does not exist" in result.stderr, result.stderr


@pytest.mark.parametrize("command, metavar", [("train", "CACHE"), ("tune", "CACHE"), ("info", "PATH")])
def test_two_different_caches_are_refused_in_one_sentence(tmp_path, command, metavar):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    result = run(command, str(a), "--cache", str(b))
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: --cache and {metavar} name different files ('{b}' and '{a}'); give the cache file once."
    )


def test_info_also_takes_dash_dash_cache(tmp_path):
    assert run("info", "--cache", str(tmp_path / "x.h5")).exit_code == 2
    (tmp_path / "y.h5").write_text("hello")
    result = run("info", "--cache", str(tmp_path / "y.h5"))
    assert result.exit_code == 2 and "HDF5" in result.stderr
    nothing = run("info")
    assert nothing.exit_code == 2 and "Missing argument PATH" in nothing.stderr
