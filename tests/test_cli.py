"""The command line: help texts, exit statuses, one-sentence errors and no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from featpipe.cli import app
from videos import write_text_as_video, write_video, write_zero_byte

runner = CliRunner()
SMALL = ["--backbone", "vgg16", "--size", "32", "--frames", "8", "--weights", "none"]


def run(*args: str):
    result = runner.invoke(app, list(args))
    assert "Traceback" not in (result.output + (result.stderr or ""))
    return result


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
    for option in ("--backbone", "--data", "--csv", "--frames", "--sampling", "--size", "--weights", "--batch-size",
                   "--workers", "--dtype", "--output", "--strict", "--quiet", "--retry-failed", "--shard", "--precision"):
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


def test_shards_merge_into_a_cache_that_trains_and_evaluates(sample, tmp_path):
    cache = tmp_path / "cache"
    merged = cache / "vgg16.h5"
    for i in (1, 2):
        result = run("extract", "--data", str(sample), "--cache", str(cache), *SMALL, "--quiet", "--shard", f"{i}/2")
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
