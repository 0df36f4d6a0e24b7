"""`featpipe extract --engine ray` on a real local Ray cluster of two nodes (loopback addresses only).

The tests marked ``ray`` need the extra (`pip install "featpipe[ray]"`); `make test-ray` installs it
and runs them, `make test` leaves them out. The cluster is started once for the module by
``ray.cluster_utils.Cluster`` with both nodes on 127.0.0.2 (Ray rewrites 127.0.0.1 to the machine's
interface address), token auth and usage stats off, its own RAY_TMPDIR; every process it started
is stopped by PID at the end, even when a test fails.
"""

from __future__ import annotations

import builtins
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from cli_args import SMALL as CLI_SMALL
from cli_args import extract_args, python_m
from featpipe.backbones.frame_source import FeatureExtractor
from featpipe.backbones.registry import get_backbone
from featpipe.cache.journal import iter_journal
from featpipe.cache.schema import journal_path
from featpipe.cache.shards import merge_shards, shard_path
from featpipe.cli import app
from featpipe.errors import BackboneError, CacheError, ExtractionFailed, FeatpipeError
from featpipe.extraction.engines.ray import DriverBackbone, check_worker, clips_per_call
from featpipe.extraction.extract import extract
from featpipe.video.sample_data import write_sample_data
from videos import write_text_as_video

# batch 1: every frame is its own forward pass on either engine, so the caches are equal bit for bit
SMALL = dict(backbone="vgg16", size=32, frames=8, weights="none", quiet=True, batch_size=1)
DATASETS = ("features", "mask", "label", "split", "video", "n_frames", "failed/video", "failed/reason")
LOOPBACK = "127.0.0.2"
SRC = str(Path(__file__).resolve().parents[1] / "src")


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample") / "data"
    write_sample_data(root, train=2, val=1, test=1, seed=0)
    write_text_as_video(root / "train" / "grow" / "broken.mp4")  # a bad clip: a failed record on both engines
    return root


@pytest.fixture(scope="module")
def clean(sample, tmp_path_factory) -> Path:
    """The local engine's cache of the sample set."""
    out = tmp_path_factory.mktemp("clean") / "c.h5"
    extract(data=sample, output=out, **SMALL)
    return out


def _pids_under(marker: str) -> list[int]:
    """Processes whose command line names ``marker`` (the cluster's own temp folder): what the fixture started."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline:
                pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def cluster():
    """A two-node Ray cluster on 127.0.0.2; yields its address. Stopped by PID whatever happens."""
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="fpray", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    os.makedirs(os.path.join(tmp, "ray"))
    env = {
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TMPDIR": tmp,
        "PYTHONPATH": os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")])),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the nodes, their workers and the drivers below inherit these
    started: Cluster | None = None
    try:
        started = Cluster(
            initialize_head=True,
            shutdown_at_exit=False,
            head_node_args=dict(node_ip_address=LOOPBACK, num_cpus=2, include_dashboard=False),
        )
        started.add_node(node_ip_address=LOOPBACK, num_cpus=2)
        yield started.address
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if started is not None:
            started.shutdown()
        for pid in _pids_under(tmp):  # agents a killed driver or worker left behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def read_all(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {name: f[name][()] for name in DATASETS} | {"attrs": dict(f.attrs)}


def assert_same_cache(a: Path, b: Path) -> None:
    x, y = read_all(a), read_all(b)
    for name in DATASETS:
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)
    for key in ("backbone", "weights_fingerprint", "input_size", "frames", "sampling", "dtype"):
        assert x["attrs"][key] == y["attrs"][key]


def _cmd(data: Path, out: Path, address: str, *extra: str) -> list[str]:
    options = dict(batch_size=1, quiet=True, engine="ray", ray_address=address)
    return python_m(*extract_args(data, out, *CLI_SMALL, *extra, **options))


def _records(out: Path) -> list[str]:
    j = journal_path(out)
    return [h["video"] for h in iter_journal(j)] if j.exists() else []


def _wait_for_records(out: Path, n: int, proc: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while len(_records(out)) < n and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


# ------------------------------------------------------------------ without Ray (run by `make test`)


def test_engine_ray_without_the_extra_says_how_to_install_it(sample, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)
    out = tmp_path / "c.h5"
    with pytest.raises(FeatpipeError, match=r'pip install "featpipe\[ray\]"'):
        extract(data=sample, output=out, engine="ray", **SMALL)
    result = CliRunner().invoke(app, ["extract", "--data", str(sample), "--output", str(out), "--engine", "ray"])
    assert result.exit_code == 2
    assert 'pip install "featpipe[ray]"' in result.output and "Traceback" not in result.output
    assert not out.exists() and not journal_path(out).exists(), "nothing was started"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--engine", "spark"], "'spark' is not one of 'local', 'ray'"),
        (["--engine", "ray", "--num-workers", "0"], "--num-workers must be between 1 and 10000, got 0"),
        (["--engine", "ray", "--gpus-per-worker", "-1"], "--gpus-per-worker must be at least 0 and at most 64"),
        (["--engine", "ray", "--gpus-per-worker", "nan"], "--gpus-per-worker must be a finite number"),
        (["--num-workers", "2"], "--num-workers is for --engine ray only"),
        (["--ray-address", "10.0.0.1:6379"], "--ray-address is for --engine ray only"),
    ],
)
def test_engine_options_are_checked_before_any_work(sample, tmp_path, args, message):
    out = tmp_path / "c.h5"
    result = CliRunner().invoke(app, ["extract", "--data", str(sample), "--output", str(out), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()


def test_the_api_checks_the_engine_options_the_same_way(sample, tmp_path):
    with pytest.raises(FeatpipeError, match="engine must be one of local, ray"):
        extract(data=sample, output=tmp_path / "c.h5", engine="spark", **SMALL)
    with pytest.raises(FeatpipeError, match="gpus_per_worker is for --engine ray only"):
        extract(data=sample, output=tmp_path / "c.h5", gpus_per_worker=1, **SMALL)


def test_a_worker_with_other_weights_or_keras_is_refused_in_one_sentence():
    row = {"fatal": "", "worker": "node-b (pid 7)", "fingerprint": "abc", "keras_version": "3.0.0"}
    check_worker(row, "abc", "3.0.0")  # the same: accepted
    with pytest.raises(BackboneError, match="other backbone weights or another Keras version") as err:
        check_worker({**row, "fingerprint": "xyz"}, "abc", "3.0.0")
    assert "node-b (pid 7)" in str(err.value) and str(err.value).count(". ") <= 1
    with pytest.raises(BackboneError, match="Keras 3.1.0"):
        check_worker({**row, "keras_version": "3.1.0"}, "abc", "3.0.0")
    with pytest.raises(ExtractionFailed, match="The backbone failed on Ray worker node-b"):
        check_worker({**row, "fatal": "OSError: no weights file"}, "abc", "3.0.0")


def test_the_driver_side_backbone_records_what_the_full_extractor_would(tmp_path):
    """Under --engine ray the driver builds no network to run: the same cache settings and fingerprint, on a thread."""
    for name, size, batch in (("vgg16", 32, 4), ("vgg16", 32, None), ("raw", 16, None)):
        full = FeatureExtractor(name, size, "none", 3, batch)
        light = DriverBackbone(get_backbone(name), size, "none", 3, batch, "float32")
        assert light.wait() == full.fingerprint == light.fingerprint
        for attr in ("weights", "feature_shape", "batch_size", "precision", "size"):
            assert getattr(light, attr) == getattr(full, attr), attr
        assert light.cache_dtype("float16") == full.cache_dtype("float16")
    missing = tmp_path / "nope.h5"
    with pytest.raises(BackboneError) as theirs:
        FeatureExtractor("vgg16", 32, str(missing), 0, 4)
    light = DriverBackbone(get_backbone("vgg16"), 32, str(missing), 0, 4, "float32")
    with pytest.raises(BackboneError) as mine:
        light.wait()
    assert str(mine.value) == str(theirs.value), "the local engine's sentence"


def test_actor_calls_are_whole_decode_blocks():
    # 4 backbone batches of 32 frames at 20 frames a clip is 7 clips: 8, so that blocks of 4 make no 1-clip call
    assert [clips_per_call(32, 20), clips_per_call(1, 8), clips_per_call(64, 16), clips_per_call(128, 20)] == [
        8,
        4,
        16,
        28,
    ]


# ------------------------------------------------------------- on the two-node cluster (`make test-ray`)


@pytest.mark.ray
def test_ray_engine_writes_the_local_engines_cache_bit_for_bit(sample, clean, cluster, tmp_path):
    out = tmp_path / "ray.h5"
    result = extract(data=sample, output=out, engine="ray", ray_address=cluster, num_workers=2, **SMALL)
    assert result.n_new == 16 and result.n_clips == 16
    assert [v for v, _ in result.failed] == ["train/grow/broken.mp4"], "the bad clip is a failed record, not an abort"
    assert not journal_path(out).exists()
    assert_same_cache(out, clean)


@pytest.mark.ray
def test_a_shard_under_ray_merges_with_a_local_shard_into_the_clean_cache(sample, clean, cluster, tmp_path):
    whole = tmp_path / "c.h5"
    extract(data=sample, output=whole, shard="1/2", engine="ray", ray_address=cluster, num_workers=1, **SMALL)
    extract(data=sample, output=whole, shard="2/2", **SMALL)
    merged = merge_shards([shard_path(whole, 1, 2), shard_path(whole, 2, 2)], whole)
    assert_same_cache(merged, clean)


@pytest.mark.ray
def test_driver_sigkill_then_the_same_command_resumes_to_the_clean_cache(sample, clean, cluster, tmp_path):
    out = tmp_path / "c.h5"
    # Ray hands results back in bursts: on an idle machine all 17 clips could be journaled between two polls.
    # A start-up hook slows the driver's journal appends (0.5 s each), so the kill lands mid-run on any machine.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import time\nimport featpipe.cache.writer as c\n_append = c.CacheWriter.append\n\n\n"
        "def append(self, rec):\n    _append(self, rec)\n    time.sleep(0.5)\n\n\nc.CacheWriter.append = append\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), SRC, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(_cmd(sample, out, cluster), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        _wait_for_records(out, 3, proc)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    journaled = _records(out)
    assert 3 <= len(journaled) < 17 and len(set(journaled)) == len(journaled)
    # the same command again (through the API: one Python start-up less)
    again = extract(data=sample, output=out, engine="ray", ray_address=cluster, **SMALL)
    assert again.n_skipped == len(journaled), "only clips not yet journaled were redone"
    assert_same_cache(out, clean)


@pytest.mark.ray
def test_a_cache_made_with_other_weights_is_refused_before_anything_is_written(sample, clean, cluster, tmp_path):
    out = tmp_path / "c.h5"
    shutil.copy(clean, out)
    before = out.read_bytes()
    # --retry-failed leaves the bad clip to do: the cluster runs it, the cache is checked when its row comes back
    with pytest.raises(CacheError, match=r"existing cache .* \(weights_fingerprint: \w+ requested, \w+ in the cache\)"):
        extract(
            data=sample,
            output=out,
            engine="ray",
            ray_address=cluster,
            num_workers=1,
            retry_failed=True,
            **{**SMALL, "seed": 1},
        )
    assert out.read_bytes() == before and not journal_path(out).exists()


def _actor_pids() -> list[int]:
    """The backbone actors' processes (Ray titles them after the UDF class)."""
    return _pids_under("ClipEmbedder")


@pytest.mark.ray
def test_a_killed_worker_loses_and_duplicates_nothing(sample, clean, cluster, tmp_path):
    out = tmp_path / "c.h5"
    proc = subprocess.Popen(
        _cmd(sample, out, cluster, "--num-workers", "2"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_for_records(out, 2, proc)
        victims = _actor_pids()
        assert proc.poll() is None and victims, "no worker to kill while the run was going"
        os.kill(victims[0], signal.SIGKILL)  # Ray restarts the actor and retries its batch
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert_same_cache(out, clean)  # every clip once: the video column equals the clean run's
