"""End to end under every Keras backend, through the real command line in fresh processes.

sample-data -> extract -> train -> evaluate -> predict at small sizes. The backends come from
FEATPIPE_TEST_BACKENDS (comma-separated), else KERAS_BACKEND, else tensorflow. The tests are marked
``backends``: `make test-backends` (and CI) runs them under tensorflow, torch and jax, and then also
CROSSES them: a cache written under one backend is trained under the next, and that run
evaluates and predicts under the one after. `make test` and `make test-slow` leave them to it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from featpipe.video.sample_data import write_sample_data

pytestmark = pytest.mark.backends

BACKENDS = [
    b.strip()
    for b in os.environ.get("FEATPIPE_TEST_BACKENDS", os.environ.get("KERAS_BACKEND", "tensorflow")).split(",")
    if b.strip()
]
# EfficientNet: batch norm (calibrated for --weights none) and an integer Normalization count, the two
# things that once gave the same `none` network another fingerprint under each backend.
BACKBONE = "efficientnetb0"
SMALL = ["--backbone", BACKBONE, "--size", "32", "--frames", "8", "--weights", "none", "--quiet"]
CLIP = "test/grow/grow_test_000.mp4"


def featpipe(backend: str, cwd: Path, *args: str) -> str:
    """Run `python -m featpipe ARGS` under a backend; return stdout, failing with stderr on a non-zero exit."""
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-m", "featpipe", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, (
        f"featpipe {' '.join(args)} under {backend} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    )
    assert "Traceback" not in proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("backends") / "data"
    write_sample_data(root, train=3, val=1, test=2, seed=0)
    return root


@pytest.fixture(scope="module")
def caches_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("caches")


_CACHES: dict[str, Path] = {}  # backend -> the cache it wrote, shared by this module's tests


def extract_under(backend: str, data: Path, work: Path) -> Path:
    """The cache `extract` writes under ``backend`` (written once per test session)."""
    if backend not in _CACHES:
        cache = work / f"{backend}.h5"
        featpipe(backend, work, "extract", "--data", str(data), "--output", str(cache), *SMALL)
        with h5py.File(cache, "r") as f:
            assert f.attrs["keras_backend"] == backend, "the cache records the backend that wrote it"
            assert len(f["video"]) == 24
        _CACHES[backend] = cache
    return _CACHES[backend]


def train_under(backend: str, cache: Path, work: Path) -> Path:
    run = work / f"run-{backend}"
    featpipe(
        backend,
        work,
        "train",
        "--rnn",
        "gru",
        "--cache",
        str(cache),
        "--epochs",
        "3",
        "--units",
        "8",
        "--out",
        str(run),
        "--quiet",
    )
    info = json.loads((run / "run.json").read_text())
    assert info["keras_backend"] == backend
    return run


def evaluate_and_predict(backend_eval: str, backend_predict: str, run: Path, cache: Path, data: Path, work: Path):
    report = json.loads(
        featpipe(backend_eval, work, "evaluate", str(run), "--cache", str(cache), "--split", "test", "--json")
    )
    assert report["n"] == 8 and report["split"] == "test" and 0.0 <= report["accuracy"] <= 1.0
    lines = featpipe(backend_predict, work, "predict", str(data / CLIP), "--model", str(run), "--json").splitlines()
    pred = json.loads(lines[0])
    assert pred["top"][0]["label"] in report["class_names"]
    return report, pred


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_whole_pipeline_runs_under_the_backend(backend, data, caches_dir, tmp_path):
    cache = extract_under(backend, data, caches_dir)
    run = train_under(backend, cache, tmp_path)
    evaluate_and_predict(backend, backend, run, cache, data, tmp_path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_features_do_not_depend_on_the_backend(backend, data, caches_dir):
    """The `none` network and the in-graph preprocessing are the same numbers under every backend."""
    import keras

    from featpipe.backbones.frame_source import FeatureExtractor
    from featpipe.video.decode import read_clip

    cache = extract_under(backend, data, caches_dir)
    here = FeatureExtractor(BACKBONE, 32, "none", batch_size=8)  # this process: KERAS_BACKEND of the test run
    clip = read_clip(data / CLIP, 8, 32, "uniform")
    with h5py.File(cache, "r") as f:
        row = list(f["video"].asstr()[:]).index(CLIP)
        stored = f["features"][row][clip.mask].astype(np.float32)
        assert f.attrs["weights_fingerprint"] == here.fingerprint, f"{backend} vs {keras.backend.backend()}"
    # float rounding differs per backend and a deep random EfficientNet amplifies it a little: agreement
    # is judged against the features' own scale (tens), stored as float16
    np.testing.assert_allclose(stored, here(clip.frames[clip.mask]), rtol=1e-2, atol=5e-3 * np.abs(stored).max())


if len(BACKENDS) > 1:  # only `make test-backends` has more than one backend installed

    @pytest.mark.parametrize("backend", BACKENDS)
    @pytest.mark.parametrize("backbone, size", [("efficientnetb0", 32)])  # batch norm and an integer count
    def test_the_none_network_has_one_fingerprint_under_every_backend(backend, backbone, size):
        """`--weights none` is one network, whatever the backend: the fingerprint a cache records under
        one backend is the one predict computes under another (README: the random network)."""
        from featpipe.backbones.registry import get_backbone
        from featpipe.backbones.weights import build_model, fingerprint

        code = (
            "from featpipe.backbones.registry import get_backbone; "
            "from featpipe.backbones.weights import build_model, fingerprint;"
            f"print(fingerprint(build_model(get_backbone({backbone!r}), {size}, 'none', seed=5)))"
        )
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.split()[-1] == fingerprint(build_model(get_backbone(backbone), size, "none", seed=5))

    CROSSINGS = [BACKENDS[i:] + BACKENDS[:i] for i in range(len(BACKENDS))]

    @pytest.mark.parametrize("order", CROSSINGS, ids=["-".join(o[:3]) for o in CROSSINGS])
    def test_a_cache_from_one_backend_trains_under_another_and_predicts_under_a_third(
        order, data, caches_dir, tmp_path
    ):
        extract_b, train_b, other = order[0], order[1], order[2 % len(order)]
        cache = extract_under(extract_b, data, caches_dir)
        run = train_under(train_b, cache, tmp_path)
        report, pred = evaluate_and_predict(other, other, run, cache, data, tmp_path)
        # the same run and clip give the same probabilities under the backend that trained it
        again = json.loads(
            featpipe(train_b, tmp_path, "predict", str(data / CLIP), "--model", str(run), "--json").splitlines()[0]
        )
        assert [t["label"] for t in again["top"]] == [t["label"] for t in pred["top"]]
        np.testing.assert_allclose(
            [t["probability"] for t in again["top"]], [t["probability"] for t in pred["top"]], atol=1e-3
        )
