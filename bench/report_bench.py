"""report.html benchmark: how long does `featpipe report` take, and how big is the page, for a large test split?

A synthetic run is built with the library's own writers, as a user would have it: a cache of
``--classes`` classes with ``--clips`` test clips (plus a small train and val split) of 20 frames x
``--dim`` float16 features at 224 px, whose clips are real mp4 files under the cache's data_root
(``--frames-per-clip`` frames of 160 x 120), and a GRU head trained on it for 2 epochs. The test
features are noise, so most test clips are misclassified and the page shows the worst 24 with
thumbnails decoded from their files.

Then ``featpipe.report(run)`` is timed ``--repeat`` times (wall time, this process; the first call
also imports what the page needs) and the size of report.html is printed.

Goal (issue 23): a run with 1,000 test clips writes its report in a few seconds, under 5 MB.

    PYTHONPATH=src python bench/report_bench.py            # 1,000 test clips
    PYTHONPATH=src python bench/report_bench.py --clips 5000
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def write_clip(path: Path, n_frames: int, label: int) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 15.0, (160, 120))
    for i in range(n_frames):
        frame = np.full((120, 160, 3), 40 + (50 * label) % 200, np.uint8)
        cv2.circle(frame, (80, 60), 5 + (2 * i) % 50, (0, 200, 255), -1)
        writer.write(frame)
    writer.release()


def build(root: Path, clips: int, classes: int, dim: int, frames_per_clip: int) -> tuple[Path, Path]:
    from featpipe.cache.schema import CacheConfig, ClipRecord
    from featpipe.cache.writer import CacheWriter

    names = tuple(f"class_{i:02d}" for i in range(classes))
    data, cache = root / "data", root / "cache" / "bench.h5"
    cache.parent.mkdir(parents=True)
    t = 20
    config = CacheConfig(
        "efficientnetb0", "none", "fp", 224, t, "uniform", "float16", (dim,), names, extra={"data_root": str(data)}
    )
    rng = np.random.default_rng(0)
    writer = CacheWriter(cache, config)
    counts = {"train": 20 * classes, "val": 6 * classes, "test": clips}
    for split, n in counts.items():
        for i in range(n):
            label = i % classes
            key = f"{split}/{names[label]}/{split}_{i:05d}.mp4"
            if split == "test":
                write_clip(data / key, frames_per_clip, label)
            feats = rng.normal(0, 1, (t, dim)).astype(np.float16)
            if split != "test":
                feats[:, label] += 2.0
            writer.append(ClipRecord(key, label, split, t, feats, np.ones(t, bool)))
    writer.finalize()
    return data, cache


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=1000, help="test clips")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--dim", type=int, default=1280, help="feature size per frame")
    parser.add_argument("--frames-per-clip", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="work folder [default: a temporary one]")
    args = parser.parse_args(argv)

    import featpipe

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        _, cache = build(root, args.clips, args.classes, args.dim, args.frames_per_clip)
        print(f"built a cache of {args.clips} test clips in {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        result = featpipe.train(cache=cache, head="gru", models_dir=root / "models", epochs=2, quiet=True)
        print(f"trained in {time.perf_counter() - started:.1f} s (train writes report.html too)")
        seconds = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            path = featpipe.report(result.run_dir)
            seconds.append(time.perf_counter() - started)
        page = path.read_text(encoding="utf-8")
        shown = page.count('class="clip"')
        print(
            f"featpipe.report, {args.clips} test clips: {', '.join(f'{s:.2f}' for s in seconds)} s "
            f"(median {statistics.median(seconds):.2f} s); report.html {path.stat().st_size / 1e6:.2f} MB, "
            f"{page.count('<img')} images, {shown} misclassified clips shown"
        )


if __name__ == "__main__":
    main()
