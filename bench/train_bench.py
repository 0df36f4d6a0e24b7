"""Stage-two benchmark: training from a cache held in memory vs streamed from HDF5.

A synthetic cache of ``--clips`` x ``--frames`` x ``--dim`` float16 features (default 5,000 x 20
x 2048 = 410 MB, the size of a mid-sized dataset through InceptionV3) is written straight with
h5py in featpipe's schema (no video). Then, each in a fresh subprocess so that peak memory is
its own, the same GRU head is trained for ``--epochs`` epochs with ``--in-memory`` and with
``--stream``. Reported: seconds per epoch (the median of the epochs after the first, which
includes tracing), the ratio stream / in-memory (target <= 1.3), the CPU seconds per epoch of
each (all threads; on a loaded machine the CPU ratio is the steadier one), the load average, and
each process's peak resident memory against the size of the features (streaming must stay well
under it).

    python bench/train_bench.py                    # the configuration in docs/results.md
    python bench/train_bench.py --clips 500 --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def write_synthetic_cache(path: Path, clips: int, frames: int, dim: int, classes: int = 4, seed: int = 0) -> None:
    """A valid featpipe cache with random features, written directly (class signal in feature 0)."""
    import h5py

    from featpipe.cache.schema import CacheConfig

    rng = np.random.default_rng(seed)
    names = tuple(f"class{i}" for i in range(classes))
    config = CacheConfig("inceptionv3", "none", "synthetic", 299, frames, "uniform", "float16", (dim,), names)
    labels = np.arange(clips) % classes
    real = rng.integers(frames // 2, frames + 1, clips)
    with h5py.File(path, "w") as f:
        for k, v in config.attrs().items():
            f.attrs[k] = v
        feats = f.create_dataset("features", (clips, frames, dim), dtype="float16", chunks=(1, frames, dim))
        block = 250
        for start in range(0, clips, block):
            n = min(block, clips - start)
            x = rng.normal(0, 1, (n, frames, dim)).astype(np.float16)
            x[:, :, 0] += labels[start : start + n, None]
            x[np.arange(frames)[None, :] >= real[start : start + n, None]] = 0
            feats[start : start + n] = x
        f["mask"] = np.arange(frames)[None, :] < real[:, None]
        f["label"] = labels
        splits = np.where(np.arange(clips) % 10 == 0, "val", "train").astype(object)
        f.create_dataset("split", data=splits, dtype=h5py.string_dtype())
        f.create_dataset(
            "video", data=np.array([f"clip{i:06d}.mp4" for i in range(clips)], dtype=object), dtype=h5py.string_dtype()
        )
        f["n_frames"] = real
        g = f.create_group("failed")
        g.create_dataset("video", shape=(0,), dtype=h5py.string_dtype())
        g.create_dataset("reason", shape=(0,), dtype=h5py.string_dtype())


def child(cache: str, stream: bool, epochs: int, batch_size: int, out: str) -> None:
    """Runs in its own process: train, time each epoch, record peak memory."""
    import keras

    from featpipe.training.train import train

    times: list[float] = []
    cpu: list[float] = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.t)
            cpu.append(time.process_time() - self.c)

    original_fit = keras.Model.fit

    def fit(self, *args, callbacks=None, **kwargs):
        return original_fit(self, *args, callbacks=[*(callbacks or []), EpochTimer()], **kwargs)

    keras.Model.fit = fit
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        train(
            cache=cache,
            rnn="gru",
            epochs=epochs,
            patience=epochs,
            batch_size=batch_size,
            stream=stream,
            out=Path(tmp) / "run",
            quiet=True,
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    Path(out).write_text(
        json.dumps(
            {"epoch_seconds": times, "epoch_cpu_seconds": cpu, "peak_rss": peak, "total": time.perf_counter() - started}
        )
    )


def run_mode(cache: Path, stream: bool, epochs: int, batch_size: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = fh.name
    cmd = [
        sys.executable,
        __file__,
        "--child",
        str(cache),
        "--child-stream",
        str(int(stream)),
        "--epochs",
        str(epochs),
        "--batch-size",
        str(batch_size),
        "--child-out",
        out,
    ]
    subprocess.run(cmd, check=True)
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    return result


def baseline_rss() -> int:
    """Peak memory of a process that only imports featpipe's training stack (the fixed cost)."""
    code = (
        "import resource, keras, featpipe.training.train, featpipe.training.heads.registry, h5py;"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(proc.stdout.split()[-1])


def steady(values: list[float]) -> float:
    """The median of the epochs after the first (the first includes tracing)."""
    return float(np.median(values[1:] if len(values) > 1 else values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=5000)
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument(
        "--epochs", type=int, default=3, help="epochs after the first are timed (the first includes tracing)"
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--quick", action="store_true", help="500 clips, 2 epochs: a smoke run")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-stream", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, bool(args.child_stream), args.epochs, args.batch_size, args.child_out)
        return
    if args.quick:
        args.clips, args.epochs = 500, 2

    import keras

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "synthetic.h5"
        t = time.perf_counter()
        write_synthetic_cache(cache, args.clips, args.frames, args.dim)
        features_bytes = args.clips * args.frames * args.dim * 2
        print(
            f"synthetic cache: {args.clips} clips x {args.frames} x {args.dim} float16 = "
            f"{features_bytes / 2**20:.0f} MiB on disk ({time.perf_counter() - t:.1f}s to write)",
            flush=True,
        )
        base = baseline_rss()
        load_before = os.getloadavg()
        memory = run_mode(cache, False, args.epochs, args.batch_size)
        stream = run_mode(cache, True, args.epochs, args.batch_size)
        load_after = os.getloadavg()
    mem_epoch, stream_epoch = steady(memory["epoch_seconds"]), steady(stream["epoch_seconds"])
    mem_cpu, stream_cpu = steady(memory["epoch_cpu_seconds"]), steady(stream["epoch_cpu_seconds"])
    results = {
        "clips": args.clips,
        "frames": args.frames,
        "dim": args.dim,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "features_mib_float16": features_bytes / 2**20,
        "features_mib_float32": features_bytes * 2 / 2**20,
        "in_memory": memory,
        "stream": stream,
        "import_baseline_rss": base,
        "stream_over_memory_epoch": stream_epoch / mem_epoch,
        "stream_over_memory_cpu": stream_cpu / mem_cpu,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}",
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
    }
    mib = lambda b: b / 2**20  # noqa: E731
    print()
    print(
        f"featpipe stage-two benchmark: GRU head, {args.clips} clips x {args.frames} x {args.dim}, batch "
        f"{args.batch_size}, {results['machine']}, keras {keras.__version__} ({results['backend']})"
    )
    print()
    print("| feeding | epoch (s) | CPU per epoch (s) | peak memory (MiB) | peak above import baseline (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for name, r, e, c in (
        ("in memory", memory, mem_epoch, mem_cpu),
        ("streamed from HDF5", stream, stream_epoch, stream_cpu),
    ):
        print(f"| {name} | {e:.2f} | {c:.2f} | {mib(r['peak_rss']):.0f} | {mib(r['peak_rss'] - base):.0f} |")
    print()
    print(
        f"features: {results['features_mib_float16']:.0f} MiB float16 on disk, "
        f"{results['features_mib_float32']:.0f} MiB as float32 in memory; import baseline {mib(base):.0f} MiB"
    )
    print(
        f"stream / in-memory epoch time: {results['stream_over_memory_epoch']:.2f}  (target <= 1.3); "
        f"CPU time: {results['stream_over_memory_cpu']:.2f}"
    )
    print(
        "epochs (s): in memory "
        + ", ".join(f"{t:.2f}" for t in memory["epoch_seconds"])
        + "; streamed "
        + ", ".join(f"{t:.2f}" for t in stream["epoch_seconds"])
    )
    print(
        "load average (1, 5, 15 min) before: "
        + ", ".join(f"{v:.2f}" for v in load_before)
        + "; after: "
        + ", ".join(f"{v:.2f}" for v in load_after)
        + f"  ({os.cpu_count()} CPUs; compare runs only when it is low)"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
