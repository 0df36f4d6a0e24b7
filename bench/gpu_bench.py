"""GPU benchmark of stage one: video files to HDF5 against the backbone-alone ceiling.

For each configuration (default: InceptionV3 at 299 px and EfficientNetB7 at 600 px), in ONE
run, on THE SAME clips, with the same network, precision and batch size:

``ceiling``
    ``FeatureExtractor`` alone on frames decoded beforehand (decoding not timed), after a
    warm-up call: the most any pipeline can do on this device.
``featpipe``
    ``featpipe.extraction.extract.extract`` end to end, video files in, finished cache out. Reported two
    ways: wall time of the whole call (model build and compile included) and the pipeline
    alone (wall time minus the set-up before the first clip is decoded). The target is on
    the pipeline: the set-up is a fixed cost that does not grow with the dataset.
``keras_example``
    The keras.io example's method (decode every frame, one ``predict`` per frame) on the
    first ``--keras-clips`` clips only: it is slow enough that a few clips measure it.

Plus the GPU's busy fraction while each method runs (``nvidia-smi`` utilization, sampled every
100 ms) and featpipe's own view of it: the share of the pipeline's time spent inside backbone
calls, and how long the backbone waited for frames.

Clips: synthetic 320x240 MPEG-4 clips at 25 fps (UCF101's size), ``--unique`` of them written
once and linked ``--clips`` times under different names, so every link is decoded again; or
your own dataset with ``--data``.

Targets (one H100): featpipe pipeline >= 0.90 x ceiling frames/s, and >= 3,000 frames/s for
InceptionV3 at 299. Run on a machine with a GPU and a GPU build of the Keras backend, e.g.

    KERAS_BACKEND=torch python bench/gpu_bench.py --json gpu.json    # or: make gpu-bench
    python bench/gpu_bench.py --quick                                  # CPU smoke run, about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from extract_bench import decode_all, machine_info, real_frames, run_ceiling, run_keras_example  # noqa: E402
from featpipe.backbones.frame_source import FeatureExtractor  # noqa: E402
from featpipe.backbones.registry import get_backbone  # noqa: E402
from featpipe.extraction.extract import extract  # noqa: E402
from featpipe.runtime.devices import (
    current_device,  # noqa: E402
    default_workers,  # noqa: E402
)
from featpipe.video.datasets import index_dataset  # noqa: E402

CONFIGS = {"inceptionv3": 299, "efficientnetb7": 600}
QUICK = {"inceptionv3": 75, "efficientnetb7": 64}
TARGET_RATIO = 0.90  # featpipe pipeline frames/s over ceiling frames/s, at least
TARGET_FPS = {"inceptionv3": 3000.0}  # featpipe frames/s on one H100, at least


class GpuSampler:
    """GPU utilization (%) from ``nvidia-smi -lms 100`` while the ``with`` block runs; None without one."""

    def __init__(self):
        self.samples: list[float] = []
        self._proc = None
        self._thread = None

    def __enter__(self) -> "GpuSampler":
        exe = shutil.which("nvidia-smi")
        if exe:
            self._proc = subprocess.Popen(
                [exe, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100", "-i", "0"],
                stdout=subprocess.PIPE,
                text=True,
                stderr=subprocess.DEVNULL,
            )
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                self.samples.append(float(line.strip()))
            except ValueError:
                pass

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
            self._thread.join(timeout=10)

    @property
    def busy(self) -> float | None:
        return float(np.mean(self.samples)) / 100.0 if self.samples else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help="comma-separated backbone[@size] list (default: inceptionv3@299,efficientnetb7@600)",
    )
    p.add_argument("--clips", type=int, default=None, help="clips per configuration (default 1000; 6 with --quick)")
    p.add_argument("--unique", type=int, default=32, help="distinct synthetic clips written (the rest are links)")
    p.add_argument("--data", default=None, help="use this dataset folder instead of synthetic clips")
    p.add_argument("--frames", type=int, default=20, help="frames per clip (default 20)")
    p.add_argument(
        "--precision",
        default=None,
        help="float32, mixed_float16 or mixed_bfloat16 (default: mixed_float16 on a GPU, float32 on CPU)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="frames per forward pass (default: from GPU memory)")
    p.add_argument("--workers", type=int, default=None, help=f"decode threads (default {default_workers()})")
    p.add_argument("--weights", default="none", help="imagenet, none (random, no download) or a weights file")
    p.add_argument("--keras-clips", type=int, default=8, help="clips for the per-frame Keras example method")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--quick", action="store_true", help="tiny smoke run at small sizes (works on a CPU)")
    args = p.parse_args(argv)
    args.clips = args.clips or (6 if args.quick else 1000)
    args.workers = args.workers or default_workers()
    configs = []
    for item in args.configs.split(","):
        name, _, size = item.strip().partition("@")
        backbone = get_backbone(name).name
        configs.append(
            (
                backbone,
                int(size)
                if size
                else (QUICK if args.quick else CONFIGS).get(backbone) or get_backbone(backbone).default_size,
            )
        )
    args.configs = configs
    return args


def write_clips(folder: Path, n_unique: int, n_total: int, frames: int = 75) -> Path:
    """``n_total`` clips in split folders: ``n_unique`` distinct 320x240 videos, the rest links to them."""
    rng = np.random.default_rng(0)
    sources = []
    for i in range(n_unique):
        path = folder / "src" / f"clip_{i:03d}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25.0, (320, 240))
        base = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        for t in range(frames):  # moving textured content, so the codec has real work
            frame = cv2.resize(np.roll(base, t, axis=1), (320, 240), interpolation=cv2.INTER_LINEAR)
            writer.write(frame)
        writer.release()
        sources.append(path)
    for j in range(n_total):
        target = folder / "data" / "train" / f"class_{j % 4}" / f"clip_{j:05d}.mp4"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(sources[j % n_unique].resolve())
    return folder / "data"


def bench_config(args, backbone: str, size: int, data: Path, tmp: Path) -> dict:
    dataset = index_dataset(data)
    records = list(dataset.records)
    clips, _ = decode_all(records, args.frames, size, "uniform")
    frames = real_frames(clips)
    print(f"\n{backbone} @ {size}px: {len(records)} clips, {len(frames)} frames; building ...", flush=True)
    extractor = FeatureExtractor(backbone, size, args.weights, 0, args.batch_size, args.precision)
    extractor(frames[: extractor.batch_size])  # compile / trace outside the timing
    out = {
        "backbone": backbone,
        "size": size,
        "clips": len(records),
        "frames": int(len(frames)),
        "batch_size": extractor.batch_size,
        "precision": extractor.precision,
        "jit_compile": extractor.jit_compile,
    }

    with GpuSampler() as gpu:
        seconds, _ = run_ceiling(extractor, frames)
    out["ceiling"] = {"seconds": seconds, "frames_per_second": len(frames) / seconds, "gpu_busy": gpu.busy}
    print(f"  ceiling   {len(frames) / seconds:10.1f} frames/s", flush=True)

    cache = tmp / f"{backbone}.h5"
    with GpuSampler() as gpu:
        result = extract(
            data=data,
            output=cache,
            backbone=backbone,
            size=size,
            frames=args.frames,
            weights=args.weights,
            precision=args.precision,
            batch_size=extractor.batch_size,
            workers=args.workers,
            quiet=True,
        )
    if result.new_frames != len(frames) or result.failed:
        raise RuntimeError(
            f"featpipe extracted {result.new_frames} frames ({len(result.failed)} failed), "
            f"expected {len(frames)}: the methods would not compare the same work"
        )
    pipeline = result.seconds - result.setup_seconds
    out["featpipe"] = {
        "seconds": result.seconds,
        "setup_seconds": result.setup_seconds,
        "pipeline_seconds": pipeline,
        "frames_per_second": result.new_frames / result.seconds,
        "pipeline_frames_per_second": result.new_frames / pipeline,
        "gpu_busy": gpu.busy,
        "backbone_busy": result.infer_seconds / pipeline,
        "starved_seconds": result.starved_seconds,
    }
    print(
        f"  featpipe  {result.new_frames / pipeline:10.1f} frames/s (pipeline), "
        f"{result.new_frames / result.seconds:.1f} with set-up",
        flush=True,
    )
    cache.unlink()

    subset = records[: args.keras_clips]
    with GpuSampler() as gpu:
        seconds, extra = run_keras_example(extractor, subset, args.frames)
    out["keras_example"] = {
        "seconds": seconds,
        "frames": extra["frames"],
        "clips": len(subset),
        "frames_per_second": extra["frames"] / seconds,
        "gpu_busy": gpu.busy,
    }
    print(f"  keras     {extra['frames'] / seconds:10.1f} frames/s ({len(subset)} clips)", flush=True)

    ceiling_fps = out["ceiling"]["frames_per_second"]
    out["ratios"] = {
        "featpipe_pipeline_over_ceiling": out["featpipe"]["pipeline_frames_per_second"] / ceiling_fps,
        "featpipe_with_setup_over_ceiling": out["featpipe"]["frames_per_second"] / ceiling_fps,
        "featpipe_over_keras_example": out["featpipe"]["pipeline_frames_per_second"]
        / out["keras_example"]["frames_per_second"],
    }
    return out


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def print_table(results: list[dict], device: str) -> str:
    lines = [
        f"device: {device}",
        "",
        "| backbone | precision, batch | ceiling frames/s | featpipe frames/s (pipeline / with set-up) "
        "| featpipe / ceiling | Keras example frames/s | GPU busy: ceiling / featpipe / Keras |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        f, c, k = r["featpipe"], r["ceiling"], r["keras_example"]
        lines.append(
            f"| {r['backbone']} @ {r['size']} | {r['precision']}, {r['batch_size']} | "
            f"{c['frames_per_second']:.0f} | {f['pipeline_frames_per_second']:.0f} / "
            f"{f['frames_per_second']:.0f} | "
            f"{r['ratios']['featpipe_pipeline_over_ceiling']:.2f} | {k['frames_per_second']:.1f} | "
            f"{pct(c['gpu_busy'])} / {pct(f['gpu_busy'])} / {pct(k['gpu_busy'])} |"
        )
    lines.append("")
    for r in results:
        f = r["featpipe"]
        target = TARGET_FPS.get(r["backbone"])
        verdict = [f"featpipe/ceiling {r['ratios']['featpipe_pipeline_over_ceiling']:.2f} (target >= {TARGET_RATIO})"]
        if target:
            verdict.append(f"{f['pipeline_frames_per_second']:.0f} frames/s (target >= {target:.0f} on one H100)")
        lines.append(
            f"{r['backbone']}: " + "; ".join(verdict) + f"; backbone busy {pct(f['backbone_busy'])} of the "
            f"pipeline, waited {f['starved_seconds']:.2f} s for frames; set-up {f['setup_seconds']:.1f} s"
        )
    text = "\n".join(lines)
    print("\n" + text)
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = current_device()
    args.precision = args.precision or ("mixed_float16" if device.accelerator else "float32")
    name = device.name if device.accelerator else f"CPU only ({os.cpu_count()} cores): not a GPU measurement"
    print(f"device: {name}; precision {args.precision}; {args.workers} decode workers", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="featpipe-gpu-bench-") as tmp:
        data = Path(args.data) if args.data else write_clips(Path(tmp), min(args.unique, args.clips), args.clips)
        for backbone, size in args.configs:
            results.append(bench_config(args, backbone, size, data, Path(tmp)))
    table = print_table(results, name)
    if args.json:
        payload = {
            "device": name,
            "machine": machine_info(),
            "args": {k: v for k, v in vars(args).items()},
            "results": results,
            "table": table,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
