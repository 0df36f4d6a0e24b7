"""The GPU benchmark stays runnable with one command (here as a tiny CPU smoke run)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_bench.py"


def load_gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_bench_measures_ceiling_featpipe_and_the_keras_method_on_the_same_clips(tmp_path, capsys):
    bench = load_gpu_bench()
    out = tmp_path / "gpu.json"
    assert (
        bench.main(
            [
                "--quick",
                "--configs",
                "vgg16@32",
                "--clips",
                "4",
                "--unique",
                "2",
                "--frames",
                "4",
                "--keras-clips",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert "not a GPU measurement" in result["device"], "a CPU run says so instead of passing for a GPU figure"
    (r,) = result["results"]
    assert (r["backbone"], r["size"], r["clips"]) == ("vgg16", 32, 4)
    assert r["frames"] > 0 and r["featpipe"]["pipeline_seconds"] > 0
    for method in ("ceiling", "featpipe", "keras_example"):
        assert r[method]["frames_per_second"] > 0
        assert r[method]["gpu_busy"] is None  # no nvidia-smi here: reported as unknown, never invented
    assert (
        abs(
            r["ratios"]["featpipe_pipeline_over_ceiling"]
            - r["featpipe"]["pipeline_frames_per_second"] / r["ceiling"]["frames_per_second"]
        )
        < 1e-9
    )
    assert "| vgg16 @ 32 |" in capsys.readouterr().out
