"""Foundation-backbone benchmark: featpipe's extraction against the backbone alone, per keras-hub backbone.

For each ``--backbones`` entry, in ONE run, on THE SAME clips and network (``--weights none`` by default,
so no download):

``ceiling``
    The feature network alone (``FeatureExtractor.model``: the preset's converter and the model, built and
    warmed up before timing) on frames decoded beforehand, ``batch_size`` frames a call. For a video-native
    backbone (VideoPrism, K frames a call) each clip's real frames are grouped into whole chunks as featpipe
    does (the last chunk filled with the last real frame). Decoding is not timed.
``featpipe``
    ``featpipe.extraction.extract.extract`` end to end, video files in, finished cache out (model build,
    decoding, batching across clips, writing), wall time around the call.

Reported: ``featpipe / ceiling`` (goal <= 1.2 on CPU) and the same without the model build, which
``extract`` pays once per run. Needs the hub extra. Run it on an idle machine:

    python bench/hub_bench.py                                   # clip-b16 and siglip2-b16, minutes on 2 cores
    python bench/hub_bench.py --backbones videoprism-b --frames 16 --clips 2 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from extract_bench import WEIGHTS_SEED, decode_all, machine_info, prepare_clips, run_featpipe  # noqa: E402
from featpipe.backbones.frame_source import FeatureExtractor  # noqa: E402
from featpipe.backbones.registry import get_backbone  # noqa: E402
from featpipe.runtime.devices import default_workers  # noqa: E402

TARGET_CEILING_RATIO = 1.2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", default="clip-b16,siglip2-b16", help="comma-separated keras-hub entries")
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--frames", type=int, default=8, help="frames per clip (a multiple of 16 for videoprism-b)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--weights", default="none")
    p.add_argument("--repeats", type=int, default=2, help="repeat each method N times, report the best")
    p.add_argument("--json", default=None, metavar="FILE")
    args = p.parse_args(argv)
    args.data, args.workers = None, default_workers()
    return args


def chunked_frames(clips, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every clip's real frames, each clip's run rounded up to whole chunks of ``k`` with its last frame;
    returns the frames and which of them are real (the filler's features are dropped, as featpipe does)."""
    frames, real = [], []
    for clip in clips:
        kept = clip.frames[clip.mask]
        fill = (-len(kept)) % k
        frames.append(np.concatenate([kept, np.repeat(kept[-1:], fill, axis=0)]) if fill else kept)
        real.append(np.r_[np.ones(len(kept), bool), np.zeros(fill, bool)])
    return np.concatenate(frames), np.concatenate(real)


def one_backbone(args, name: str, tmp: Path) -> dict:
    entry = get_backbone(name)
    args.backbone, args.size = entry.name, entry.default_size
    dataset = prepare_clips(args, tmp / name)
    clips, _ = decode_all(list(dataset.records), args.frames, args.size, "uniform")
    extractor = FeatureExtractor(entry, args.size, args.weights, WEIGHTS_SEED, args.batch_size)
    frames, real = chunked_frames(clips, extractor.clip_frames)
    bs = extractor.batch_size
    extractor(frames[:bs])  # trace and warm up, outside the timing
    ceiling, featpipe, build = [], [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        feats = np.concatenate([extractor(frames[i : i + bs]) for i in range(0, len(frames), bs)])[real]
        ceiling.append(time.perf_counter() - started)
        started = time.perf_counter()
        FeatureExtractor(entry, args.size, args.weights, WEIGHTS_SEED, args.batch_size)
        build.append(time.perf_counter() - started)
        seconds, result = run_featpipe(args, dataset.root, tmp / f"{entry.file_stem}.h5", "uniform")
        if result.new_frames != int(real.sum()):
            raise RuntimeError(f"featpipe extracted {result.new_frames} frames, the ceiling {int(real.sum())}")
        featpipe.append(seconds)
    out = {
        "backbone": name,
        "clips": len(clips),
        "frames": int(real.sum()),
        "clip_frames": extractor.clip_frames,
        "batch_size": bs,
        "ceiling_seconds": min(ceiling),
        "featpipe_seconds": min(featpipe),
        "build_seconds": min(build),
        "feature_dim": int(feats.shape[-1]),
    }
    out["featpipe_over_ceiling"] = out["featpipe_seconds"] / out["ceiling_seconds"]
    out["featpipe_minus_build_over_ceiling"] = (out["featpipe_seconds"] - out["build_seconds"]) / out["ceiling_seconds"]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="featpipe-hub-bench-") as tmp:
        for name in args.backbones.split(","):
            print(f"{name} ...", flush=True)
            rows.append(one_backbone(args, name.strip(), Path(tmp)))
    machine = machine_info()
    machine["loadavg_1min_before_after"] = (load_before, os.getloadavg()[0])
    print(f"\n{machine['cpu_count']} CPUs, weights={args.weights}, best of {args.repeats}")
    print(f"goal: featpipe / ceiling <= {TARGET_CEILING_RATIO}")
    print("| backbone | clips | frames | ceiling s | featpipe s | featpipe / ceiling | without the build |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['backbone']} | {r['clips']} | {r['frames']} | {r['ceiling_seconds']:.1f} | "
            f"{r['featpipe_seconds']:.1f} | {r['featpipe_over_ceiling']:.2f} | "
            f"{r['featpipe_minus_build_over_ceiling']:.2f} |"
        )
    print(f"1-min load average before/after: {load_before:.2f}/{os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
