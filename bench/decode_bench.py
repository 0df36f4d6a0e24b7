"""Decoding benchmark: does the cost of reading a clip follow the frames kept, or the clip's length?

Three readers take THE SAME frames (20 uniform by default, centre-cropped to 224 px) from THE SAME
clips, in ONE run:

``seeking``
    ``read_clip(..., decoder="pyav")``: featpipe's default decoder. It learns the frame times from
    the container's index, seeks to the keyframe before each frame kept and decodes forward.
``sequential``
    ``read_clip(..., decoder="opencv")``: reads every frame of the clip in order (the reference,
    and featpipe's only reader before the seeking one).
``ceiling``
    A minimal PyAV loop with no checks: for each frame kept, seek to its timestamp (computed from the
    frame rate), decode forward to it, convert and crop it the same way. No reader of these frames
    can do much better; the seeking decoder's overhead over it is its planning and checking.

The clips are H.264 MP4, 320x240 at 30 fps with a keyframe every 250 frames (a common encoder
setting), 10 seconds, 1 minute and 10 minutes long, with moving content; they are written once by
PyAV's libx264 into ``--clips`` and reused. Each figure is the median of ``--repeat`` timed reads
after one untimed read (the file is then in the page cache, as in a second epoch of extraction).

Only ratios are reported, no pass/fail:
- ``sequential / seeking`` on the 10-minute clip (the goal: at least 4) and on the 10 s clip (about 1);
- ``seeking / ceiling`` on the 10-minute clip (the goal: at most 1.2);
- ``10 min / 1 min`` for each reader: the cost of the same 20 frames from a 10x longer clip
  (near 1 for a seeking reader, near 10 for a sequential one).

    python bench/decode_bench.py              # about 2 minutes the first time (writing the clips), then seconds
    python bench/decode_bench.py --json decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import av
import cv2
import numpy as np
from av.video.reformatter import VideoReformatter

from featpipe import __version__ as FEATPIPE_VERSION
from featpipe.video.crop import center_crop_resize
from featpipe.video.decode import read_clip
from featpipe.video.plan import sample_indices

CLIPS = {"10s": 10, "1min": 60, "10min": 600}


def write_clip(path: Path, seconds: int, fps: int = 30, width: int = 320, height: int = 240, gop: int = 250) -> None:
    """A clip with moving content (a panning gradient, a moving disc, a little noise) that compresses
    like real footage, not like static frames or pure noise."""
    rng = np.random.default_rng(seconds)
    yy, xx = np.mgrid[0:height, 0 : width * 2]
    field = ((np.sin(xx / 23.0) + np.cos(yy / 17.0)) * 60 + 128).astype(np.uint8)
    background = np.dstack([field, np.roll(field, 40, axis=1), np.roll(field, 90, axis=0)])
    tmp = path.with_suffix(".partial.mp4")
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "preset": "veryfast"}
        for i in range(seconds * fps):
            shift = (i * 2) % width
            img = np.ascontiguousarray(background[:, shift : shift + width])
            cx, cy = int(width / 2 + 100 * np.sin(i / 40)), int(height / 2 + 70 * np.cos(i / 55))
            cv2.circle(img, (cx, cy), 30, (255, (i * 3) % 256, 40), -1)
            noise = rng.integers(0, 8, (height // 8, width // 8, 1), dtype=np.uint8)
            img[: height // 8, : width // 8] += noise
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    tmp.rename(path)


def ceiling(path: Path, frames: int, size: int) -> np.ndarray:
    """The minimal seek-and-decode loop: no index, no checks, targets from the frame rate."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate, base, start = stream.average_rate, stream.time_base, stream.start_time or 0
        reformatter = VideoReformatter()
        out = []
        for index in sample_indices(int(stream.frames), frames):
            target = start + round(int(index) / rate / base)
            container.seek(target, backward=True, stream=stream)
            for frame in container.decode(stream):
                if frame.pts >= target:
                    image = reformatter.reformat(frame, format="bgr24", threads=1).to_ndarray()
                    out.append(center_crop_resize(image, size))
                    break
        return np.stack(out)


def timed(fn, repeat: int) -> float:
    fn()  # untimed: the file is read once into the page cache, lazy imports load
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=Path, default=Path(tempfile.gettempdir()) / "featpipe-decode-bench")
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    args.clips.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, seconds in CLIPS.items():
        paths[name] = args.clips / f"h264_{name}_gop250.mp4"
        if not paths[name].exists():
            print(f"writing {paths[name]} ({seconds} s) ...", flush=True)
            write_clip(paths[name], seconds)

    readers = {
        "seeking": lambda p: read_clip(p, args.frames, args.size, decoder="pyav"),
        "sequential": lambda p: read_clip(p, args.frames, args.size, decoder="opencv"),
        "ceiling": lambda p: ceiling(p, args.frames, args.size),
    }
    # Same frames from every reader, checked before anything is timed.
    for name, path in paths.items():
        ref = readers["sequential"](path).frames
        seek = readers["seeking"](path)
        assert seek.decoder == "pyav", f"{name}: the seeking decoder fell back to sequential reading"
        assert np.array_equal(seek.frames, ref), f"{name}: seeking and sequential frames differ"
        assert np.array_equal(readers["ceiling"](path), ref), f"{name}: the ceiling loop's frames differ"

    seconds = {
        reader: {name: timed(lambda r=reader, p=path: readers[r](p), args.repeat) for name, path in paths.items()}
        for reader in readers
    }
    fps = {reader: {name: args.frames / t for name, t in row.items()} for reader, row in seconds.items()}
    ratios = {
        "sequential_over_seeking_10min": seconds["sequential"]["10min"] / seconds["seeking"]["10min"],
        "sequential_over_seeking_10s": seconds["sequential"]["10s"] / seconds["seeking"]["10s"],
        "seeking_over_ceiling_10min": seconds["seeking"]["10min"] / seconds["ceiling"]["10min"],
        "seeking_over_ceiling_10s": seconds["seeking"]["10s"] / seconds["ceiling"]["10s"],
        "seeking_10min_over_1min": seconds["seeking"]["10min"] / seconds["seeking"]["1min"],
        "sequential_10min_over_1min": seconds["sequential"]["10min"] / seconds["sequential"]["1min"],
    }
    print(f"\n{args.frames} frames at {args.size} px, median of {args.repeat}; frames kept per second of decoding:")
    print(f"{'reader':<12}" + "".join(f"{name:>10}" for name in paths))
    for reader, row in fps.items():
        print(f"{reader:<12}" + "".join(f"{row[name]:>10.1f}" for name in paths))
    print("\nratios:")
    for key, value in ratios.items():
        print(f"  {key:<32} {value:6.2f}")
    if args.json:
        record = {
            "featpipe": FEATPIPE_VERSION,
            "pyav": av.__version__,
            "opencv": cv2.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
            "frames": args.frames,
            "size": args.size,
            "repeat": args.repeat,
            "seconds": seconds,
            "frames_per_second": fps,
            "ratios": ratios,
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
