"""Ray engine benchmark: what `--engine ray` costs on one machine, and how it would scale.

Two measurements, in ONE run:

``overhead``
    The same clips through ``extract(engine="local")`` and ``extract(engine="ray")`` (wall time
    around the call, fresh cache each, same backbone, size, frames, batch size). The clips are
    the whole default sample set (what `featpipe sample-data` writes: 16 train, 6 val and 6 test
    clips per class, 112 clips), or with ``--per-class N`` N train and 1 val and 1 test clip per
    class. Ray is started once before timing (a cluster is up before jobs are sent to it); its
    start-up is reported apart. The ray engine's time includes its actors building the network,
    as the local one's includes building it once. Target: ray / local <= 1.2.
``scaling``
    The engine's own pipeline (engines.ray.build + engines.ray.consume: keyed rows, decode tasks,
    an ActorPoolStrategy pool, the driver writing through CacheWriter and the journal) with
    stand-ins for the two things this machine cannot provide: a device (a frame source that
    sleeps ``--latency-ms`` per batch of 64 frames, like a GPU, and returns 2048 float16 zeros per
    frame) and a fast decoder (frames handed over without decoding). Run at 1, 2 and 4 actors and
    one many-actor run; throughput against actors shows where the driver or the writer saturates
    (the writer's own ceiling, CacheWriter.append alone, is measured too). Target: 4 actors >= 3.5x one.

    python bench/ray_bench.py --quick           # small (8 clips of 8 frames at 75 px), a few minutes on 2 cores
    python bench/ray_bench.py --json out.json   # the configuration in docs/ray.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private, loopback-only Ray for the measurement

import numpy as np  # noqa: E402

from featpipe.cache.schema import (
    CacheConfig,
    ClipRecord,  # noqa: E402
)
from featpipe.cache.writer import CacheWriter
from featpipe.extraction.engines.ray import (  # noqa: E402
    ClipEmbedder,
    Plan,
    build,
    clips_per_call,
    consume,
    import_ray,
    quiet_ray_data,
)
from featpipe.extraction.extract import extract  # noqa: E402
from featpipe.extraction.stages import BackgroundWriter, Stats  # noqa: E402
from featpipe.video.sample_data import write_sample_data  # noqa: E402

FEATURE_DIM = 2048
FRAMES_PER_DEVICE_BATCH = 64
SIM_FRAMES = 16  # frames per clip in the simulation: 4 clips = one device batch
SIM_SIZE = 64  # stand-in frames handed from decode tasks to actors (bytes moved like real ones, smaller)


# ---------------------------------------------------------------------------------- stand-ins


class SleepSource:
    """A frame source with a fixed device latency per batch: ``latency`` seconds per call of <= 64 frames."""

    def __init__(self, latency: float):
        self.latency = latency
        self.batch_size = FRAMES_PER_DEVICE_BATCH
        self.feature_shape = (FEATURE_DIM,)

    def __call__(self, frames):
        time.sleep(self.latency)
        return np.zeros((len(frames), FEATURE_DIM), np.float32)


class SimulatedEmbedder(ClipEmbedder):
    """ClipEmbedder with the stand-in device: same batching (pipeline.embed), same rows out."""

    def __init__(self, latency: float):
        self.worker = f"sim (pid {os.getpid()})"
        self.fatal, self.fingerprint, self.keras_version = "", "simulated", "simulated"
        self.source = SleepSource(latency)
        self.dtype = np.dtype("float16")


def fake_decode(batch: dict, frames: int, size: int) -> dict:
    """Decode stand-in: every clip has ``frames`` real (blank) frames."""
    n = len(batch["key"])
    return {
        "key": batch["key"],
        "label": batch["label"],
        "split": batch["split"],
        "frames": np.zeros((n, frames, size, size, 3), np.uint8),
        "mask": np.ones((n, frames), bool),
        "n_frames": np.full(n, frames, np.int64),
        "damaged_from": np.full(n, -1, np.int64),
        "time": np.tile(np.arange(frames, dtype=np.float32) / 25, (n, 1)),
        "duration": np.full(n, frames / 25, np.float32),
        "fps": np.full(n, 25, np.float32),
        "error": np.full(n, "", dtype=object),
    }


def sim_config() -> CacheConfig:
    return CacheConfig(
        backbone="simulated",
        weights="none",
        weights_fingerprint="simulated",
        input_size=SIM_SIZE,
        frames=SIM_FRAMES,
        sampling="uniform",
        dtype="float16",
        feature_shape=(FEATURE_DIM,),
        class_names=("a", "b"),
    )


def run_simulation(actors: int, clips: int, latency: float, clips_per_call: int, tmp: Path) -> dict:
    rows = [{"key": f"clip{i:06d}", "path": "", "label": i % 2, "split": "train"} for i in range(clips)]
    ds = build(
        rows,
        Plan(actors, 0.0, 1),
        decode_fn=fake_decode,
        decode_kwargs=dict(frames=SIM_FRAMES, size=SIM_SIZE),
        embedder=SimulatedEmbedder,
        embedder_kwargs=dict(latency=latency),
        clips_per_call=clips_per_call,
        actor_cpus=0,  # sleeping actors: no CPU reserved, so many fit on 2 cores
        clips_per_decode_task=clips_per_call,  # one decode task per actor call: results arrive per call
        decode_cpus=0.25,
    )  # the stand-in decoder costs nothing: do not let 2 logical CPUs cap its tasks
    path = tmp / f"sim-{actors}.h5"
    writer = CacheWriter(path, sim_config())
    stats = Stats()
    marks: list[float] = []
    started = time.perf_counter()
    try:
        with BackgroundWriter(writer) as sink:
            consume(ds, sink, "float16", "simulated", "simulated", stats, lambda n: marks.append(time.perf_counter()))
    finally:
        writer.close()
    seconds = time.perf_counter() - started
    # steady state: the clips after the first batch back (actors started), over the time since it came
    steady = (len(marks) - clips_per_call) / (marks[-1] - marks[0]) if marks and marks[-1] > marks[0] else 0.0
    for f in tmp.glob("sim-*"):
        f.unlink()
    ideal = actors * FRAMES_PER_DEVICE_BATCH / latency / SIM_FRAMES
    return {
        "actors": actors,
        "clips": clips,
        "seconds": seconds,
        "clips_per_s": steady,
        "frames_per_s": steady * SIM_FRAMES,
        "ideal_clips_per_s": ideal,
    }


def writer_ceiling(clips: int, tmp: Path) -> float:
    """CacheWriter.append alone (journal, fsync policy as in real runs), clips/s, same record size."""
    path = tmp / "writer.h5"
    writer = CacheWriter(path, sim_config())
    feats = np.zeros((SIM_FRAMES, FEATURE_DIM), np.float16)
    mask = np.ones(SIM_FRAMES, bool)
    started = time.perf_counter()
    try:
        for i in range(clips):
            writer.append(ClipRecord(f"clip{i:06d}", i % 2, "train", SIM_FRAMES, feats, mask))
    finally:
        writer.close()
    seconds = time.perf_counter() - started
    for f in tmp.glob("writer*"):
        f.unlink()
    return clips / seconds


# ---------------------------------------------------------------------------------- overhead


def run_overhead(args, tmp: Path) -> dict:
    data = tmp / "data"
    sample = (
        write_sample_data(data, seed=0)
        if args.per_class is None  # the default sample set
        else write_sample_data(data, train=args.per_class, val=1, test=1, seed=0)
    )
    print(f"  {sample.n_clips} sample clips ({', '.join(f'{n} {s}' for s, n in sample.counts.items())})", flush=True)
    common = dict(
        data=data,
        backbone=args.backbone,
        size=args.size,
        frames=args.frames,
        weights="none",
        batch_size=args.batch_size,
        quiet=True,
    )
    out = {}
    for engine in ("local", "ray") * args.repeats:
        cache = tmp / f"{engine}.h5"
        kwargs = dict(engine="ray", num_workers=args.ray_workers) if engine == "ray" else {}
        started = time.perf_counter()
        result = extract(output=cache, **common, **kwargs)
        seconds = time.perf_counter() - started
        out.setdefault(engine, []).append(seconds)
        out[f"{engine}_clips"] = result.n_new
        cache.unlink()
        print(f"  {engine:<5} {seconds:7.2f} s ({result.n_new} clips, {result.new_frames} frames)", flush=True)
    ratio = min(out["ray"]) / min(out["local"])
    print(f"  ray / local {ratio:.2f} (target <= 1.2)", flush=True)
    return {
        "local_seconds": min(out["local"]),
        "ray_seconds": min(out["ray"]),
        "clips": out["local_clips"],
        "ratio": ratio,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="inceptionv3")
    p.add_argument("--size", type=int, default=299)
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--per-class",
        type=int,
        default=None,
        help="training clips per class of a smaller sample set (1 val and 1 test clip per class); "
        "default: the whole default sample set, 112 clips",
    )
    p.add_argument("--ray-workers", type=int, default=1, help="actors in the overhead run")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--latency-ms", type=float, default=40.0, help="stand-in device time per 64-frame batch")
    p.add_argument(
        "--sim-calls", type=int, default=30, help="actor calls (16 clips each) per actor in each simulation run"
    )
    p.add_argument("--many", type=int, default=16, help="actors in the many-actor run")
    p.add_argument("--quick", action="store_true", help="fewer clips")
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.per_class, args.sim_calls, args.size, args.frames = 2, 20, 75, 8
    ray = import_ray()
    tmp = Path(tempfile.mkdtemp(prefix="fprb", dir="/tmp"))
    os.environ.setdefault("RAY_TMPDIR", str(tmp))
    (tmp / "ray").mkdir(exist_ok=True)
    load_before = os.getloadavg()[0]
    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "ray": ray.__version__,
        }
    }
    try:
        t0 = time.perf_counter()
        ray.init(include_dashboard=False, log_to_driver=False, num_cpus=max(2, os.cpu_count() or 2))
        quiet_ray_data()
        results["ray_start_seconds"] = time.perf_counter() - t0
        print(f"local Ray started in {results['ray_start_seconds']:.1f} s", flush=True)
        if not args.skip_overhead:
            print(
                f"overhead: {args.backbone} @ {args.size}px, {args.frames} frames, batch {args.batch_size}", flush=True
            )
            results["overhead"] = run_overhead(args, tmp)
        lat = args.latency_ms / 1000
        cpc = clips_per_call(FRAMES_PER_DEVICE_BATCH, SIM_FRAMES)  # as the engine sizes actor calls
        results["writer_clips_per_s"] = writer_ceiling(2000, tmp)
        sims = []
        for actors in (1, 2, 4, args.many):
            r = run_simulation(actors, args.sim_calls * cpc * actors, lat, cpc, tmp)
            sims.append(r)
            print(
                f"  {actors:>3} actors: {r['clips_per_s']:8.1f} clips/s ({r['frames_per_s']:8.0f} frames/s), "
                f"ideal {r['ideal_clips_per_s']:8.1f}",
                flush=True,
            )
        results["scaling"] = sims
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    results["load_average"] = [load_before, os.getloadavg()[0]]
    base = results["scaling"][0]["clips_per_s"]
    print("\n| actors | clips/s | frames/s | speed-up vs 1 | ideal speed-up |")
    print("|---|---|---|---|---|")
    for r in results["scaling"]:
        print(
            f"| {r['actors']} | {r['clips_per_s']:.1f} | {r['frames_per_s']:.0f} | {r['clips_per_s'] / base:.2f}x "
            f"| {r['actors']}x |"
        )
    print(
        f"writer alone (CacheWriter.append, {SIM_FRAMES}x{FEATURE_DIM} float16 per clip): "
        f"{results['writer_clips_per_s']:.0f} clips/s"
    )
    if "overhead" in results:
        o = results["overhead"]
        print(
            f"overhead: local {o['local_seconds']:.2f} s, ray {o['ray_seconds']:.2f} s on {o['clips']} clips: "
            f"ray/local {o['ratio']:.2f} (target <= 1.2); Ray start-up apart: {results['ray_start_seconds']:.1f} s"
        )
    four = next(r for r in results["scaling"] if r["actors"] == 4)["clips_per_s"] / base
    print(
        f"4 actors / 1 actor: {four:.2f}x (target >= 3.5); load average before/after {load_before:.2f}/"
        f"{results['load_average'][1]:.2f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
