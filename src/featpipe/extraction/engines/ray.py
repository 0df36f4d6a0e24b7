"""`featpipe extract --engine ray`: stage one on a Ray cluster, with Ray Data.

The pipeline, from the driver (the process that runs `featpipe extract`):

    keyed clip rows (key, path, label, split)            ray.data.from_items
      -> decode_batch: read_clip per row, as CPU tasks     map_batches(function, num_cpus=1)
      -> ClipEmbedder: the backbone in a stateful actor    map_batches(class, compute=ActorPoolStrategy(...),
         pool, frames batched across clips (stages.embed)               num_gpus=--gpus-per-worker)
      -> rows consumed on the driver, which alone writes   CacheWriter + journal (as --engine local)

* Every row carries its clip's key: Ray does not keep the input order, and the driver writes
  each key once (an actor restarted by Ray may redo a batch).
* Nothing raises inside the UDFs: a clip that cannot be decoded comes back as a row with
  ``error`` set (a failed-clip record in the cache, as with the local engine); a backbone that
  fails comes back as rows with ``fatal`` set, which stops the run with a sentence. A raising
  UDF would abort the whole Ray job, and ``max_errored_blocks`` would drop rows silently.
* Every row says which weights fingerprint and Keras version made it; the driver refuses a
  worker whose differ from the cache's before writing anything it made.
* The driver does not build the network it never runs (:class:`DriverBackbone`): only its
  weights fingerprint, on a thread, while the cluster starts and the actors build theirs; the
  cache is checked against it, as by the local engine, before the first row is written.
* Resume, the lock, failed-clip records, --retry-failed, --strict and --shard are the local
  engine's: the driver does all of that, the cluster only computes.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from featpipe.backbones.frame_source import FrameSource, auto_batch_size, frame_source
from featpipe.backbones.registry import RAW_FINGERPRINT, WEIGHTS_NONE, Backbone, check_precision
from featpipe.backbones.weights import build_model, fingerprint, weights_label
from featpipe.cache.schema import ClipRecord, padded_times
from featpipe.cache.writer import CacheWriter
from featpipe.errors import BackboneError, ExtractionFailed, FeatpipeError
from featpipe.extraction.engines.base import Work
from featpipe.extraction.options import ExtractOptions
from featpipe.extraction.stages import Decoded, Stats, check_clip_finite, embed, writing_with_progress
from featpipe.runtime.devices import current_device
from featpipe.runtime.keras_import import import_keras

INSTALL = 'pip install "featpipe[ray]"'
CLIPS_PER_DECODE_TASK = 4  # rows per decode task (one block of input rows each)


def import_ray():
    """``ray`` with Ray Data, or a sentence saying how to install it (exit 2)."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise FeatpipeError(
            f"--engine ray needs Ray Data, which is not installed here; install it with "
            f"{INSTALL} (on every node of the cluster)."
        ) from None
    return ray


@dataclass(frozen=True)
class Plan:
    """What the Ray engine will run with, once the cluster is known."""

    num_workers: int  # backbone actors
    gpus_per_worker: float  # GPUs reserved by each actor
    nodes: int  # alive nodes in the cluster


def connect(address: str | None):
    """Join the cluster at ``address`` (or RAY_ADDRESS / the one `ray start` left), else start a local Ray.

    Returns True when this call initialised Ray (so the caller shuts it down).
    """
    ray = import_ray()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # featpipe never reports usage
    if ray.is_initialized():
        return False
    try:
        ray.init(
            address=address or None,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            configure_logging=False,
        )
    except ConnectionError as exc:
        raise FeatpipeError(
            f"Could not join the Ray cluster at '{address}' ({exc}); start it with `ray start --head` "
            f"and pass its address (host:port) to --ray-address."
        ) from None
    return True


def plan(num_workers: int | None, gpus_per_worker: float | None) -> Plan:
    """Actors and GPUs per actor: by default one actor per GPU in the cluster, or one per node without GPUs."""
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0))
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    g = (1.0 if gpus else 0.0) if gpus_per_worker is None else float(gpus_per_worker)
    if g > 0 and gpus < g:
        raise FeatpipeError(
            f"--gpus-per-worker {g:g} asks for GPUs, but the Ray cluster has {gpus:g}; "
            f"pass --gpus-per-worker 0 to run the backbone on CPUs."
        )
    n = num_workers or (max(1, int(gpus // g)) if g > 0 else max(1, nodes))
    if g > 0 and n * g > gpus:
        raise FeatpipeError(
            f"--num-workers {n} with --gpus-per-worker {g:g} needs {n * g:g} GPUs; the Ray cluster has {gpus:g}."
        )
    return Plan(n, g, nodes)


class DriverBackbone:
    """The backbone as the driver needs it under --engine ray: what the cache records, no compiled network.

    A :class:`~featpipe.backbones.frame_source.FrameSource` for what extract() reads of one (weights
    label, feature shape, cache dtype, batch size, precision, :meth:`wait`); it is never called on frames.
    The weights fingerprint needs the network with
    its weights (for --weights none a NumPy calibration, about 15 s for InceptionV3 at 299 px on
    2 cores): it is computed on a thread started here, so that it overlaps the cluster starting
    and the actors importing TensorFlow and building their own. ``fingerprint`` is None until
    :meth:`wait` returns it (or raises what building the network raised, as the local engine does).
    """

    def __init__(self, backbone, size: int, weights: str, seed: int, batch_size: int | None, precision: str):
        if not backbone.raw:
            import_keras()  # here: the import filters fd 2 for the whole process, not something for two threads
        self.backbone, self.size, self.seed = backbone, size, seed
        self.precision = check_precision(precision)
        self.weights = WEIGHTS_NONE if backbone.raw else weights_label(weights, backbone)
        self.feature_shape: tuple[int, ...] = (size, size, 3) if backbone.raw else (backbone.feature_dim,)
        self.fingerprint: str | None = RAW_FINGERPRINT if backbone.raw else None
        self.clip_frames = k = int(backbone.clip_frames)
        device = None if backbone.raw or batch_size else current_device()
        self._batch_size = batch_size or (32 if device is None or not device.accelerator else None)
        if self._batch_size is not None:  # whole chunks, as FeatureExtractor rounds it
            self._batch_size = -(-self._batch_size // k) * k
        self._error: BaseException | None = None
        self._done = threading.Event()
        if self.fingerprint is not None:
            self._done.set()
            return

        def build():
            try:
                model = build_model(backbone, size, self.weights, seed)
                if self._batch_size is None:  # an accelerator here: the local engine's estimate, for the call sizes
                    self._batch_size = auto_batch_size(model, device, self.precision, self.clip_frames)
                self.fingerprint = fingerprint(model)
            except BaseException as exc:  # noqa: BLE001 -- re-raised by wait(), on the driver's thread
                self._error = exc
            finally:
                self._done.set()

        threading.Thread(target=build, name="featpipe-fingerprint", daemon=True).start()

    def wait(self) -> str:
        """The weights fingerprint, once computed (raises what building the network raised)."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self.fingerprint

    @property
    def batch_size(self) -> int:
        """Frames per forward pass: --batch-size, else the local engine's choice for this machine."""
        if self._batch_size is None:
            self.wait()
        return int(self._batch_size)

    def cache_dtype(self, requested: str) -> str:
        return "uint8" if self.backbone.raw else requested

    def warm_up(self) -> None:
        """Nothing to compile: the actors run the network."""

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        raise TypeError("the Ray driver's backbone runs no frames: its actors do")


def decode_batch(
    batch: dict, frames: int, size: int, sampling: str, fps: float | None = None, decoder: str = "auto"
) -> dict:
    """Ray Data UDF (a CPU task): decode each row's clip. Never raises: a bad clip is a row with ``error``."""
    from featpipe.video.decode import read_clip  # lazy: `import featpipe` does not load OpenCV

    n = len(batch["key"])
    out_frames = np.zeros((n, frames, size, size, 3), np.uint8)
    mask = np.zeros((n, frames), bool)
    n_frames = np.zeros(n, np.int64)
    damaged_from = np.full(n, -1, np.int64)  # -1: a whole clip (see ClipFrames.damaged_from)
    time = np.full((n, frames), np.nan, np.float32)  # as ClipRecord.times: NaN on padding
    duration, rate = np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32)  # rate: the container's fps
    error = np.full(n, "", dtype=object)
    for i, path in enumerate(batch["path"]):
        try:
            clip = read_clip(str(path), frames, size, sampling, fps=fps, decoder=decoder)
        except Exception as exc:  # noqa: BLE001 -- a raising UDF aborts the Ray job: every clip error is a record
            error[i] = str(exc) or type(exc).__name__
            continue
        out_frames[i], mask[i], n_frames[i] = clip.frames, clip.mask, clip.n_frames
        time[i], duration[i], rate[i] = padded_times(clip.times, frames), clip.duration, clip.fps
        if clip.damaged_from is not None:
            damaged_from[i] = clip.damaged_from
    return {
        "key": batch["key"],
        "label": batch["label"],
        "split": batch["split"],
        "frames": out_frames,
        "mask": mask,
        "n_frames": n_frames,
        "damaged_from": damaged_from,
        "time": time,
        "duration": duration,
        "fps": rate,
        "error": error,
    }


@dataclass
class _Window:
    """What ``stages.embed`` needs of a decoded clip."""

    frames: np.ndarray
    mask: np.ndarray


class ClipEmbedder:
    """Ray Data UDF class: one backbone per actor (built once), frames of a batch of clips batched across clips.

    Every output row says who made it (``worker``), with which weights (``fingerprint``) and Keras
    version, so the driver can refuse a node that differs from the cache. Never raises.
    """

    def __init__(
        self,
        backbone: Backbone | str,
        size: int,
        weights: str,
        seed: int,
        batch_size: int | None,
        precision: str,
        dtype: str,
    ):
        self.worker = f"{socket.gethostname()} (pid {os.getpid()})"
        self.source, self.fatal, self.keras_version, self.fingerprint = None, "", "", ""
        try:
            self.keras_version = import_keras().__version__
            self.source = frame_source(backbone, size, weights, seed, batch_size, precision)
            self.fingerprint = self.source.fingerprint
            self.dtype = np.dtype(self.source.cache_dtype(dtype))
            self.source.warm_up()
        except Exception as exc:  # noqa: BLE001 -- reported to the driver as rows, which stops the run with it
            self.fatal = f"{type(exc).__name__}: {exc}"

    def __call__(self, batch: dict) -> dict:
        n = len(batch["key"])
        fatal = self.fatal
        feats = None
        stats = Stats()
        if not fatal:
            try:
                clips = [
                    Decoded(i, [_Window(batch["frames"][i], batch["mask"][i])])
                    for i in range(n)
                    if not batch["error"][i]
                ]
                feats = np.zeros((n, *batch["mask"].shape[1:], *self.source.feature_shape), self.dtype)
                for done in embed(clips, self.source, stats):
                    feats[done.item] = done.features[0].astype(self.dtype)  # as the local engine stores them
            except Exception as exc:  # noqa: BLE001 -- reported to the driver, which stops the run with it
                fatal = f"{type(exc).__name__}: {exc}"
        if feats is None:
            feats = np.zeros((n, 1), np.float32)
        return {
            "key": batch["key"],
            "label": batch["label"],
            "split": batch["split"],
            "mask": batch["mask"],
            "n_frames": batch["n_frames"],
            "damaged_from": batch["damaged_from"],
            "time": batch["time"],
            "duration": batch["duration"],
            "fps": batch["fps"],
            "error": batch["error"],
            "features": feats,
            "fatal": np.full(n, fatal, dtype=object),
            "fingerprint": np.full(n, self.fingerprint, dtype=object),
            "keras_version": np.full(n, self.keras_version, dtype=object),
            "worker": np.full(n, self.worker, dtype=object),
            "infer_seconds": np.full(n, stats.infer_seconds / max(n, 1)),
        }


def check_worker(row: dict[str, Any], fingerprint: str, keras_version: str) -> None:
    """Refuse rows made with other weights or another Keras version than the cache's (one sentence)."""
    if row["fatal"]:
        raise ExtractionFailed(
            f"The backbone failed on Ray worker {row['worker']}: {row['fatal']}. "
            f"The clips finished before are saved; fix that node and run the same command again."
        )
    if row["fingerprint"] != fingerprint or row["keras_version"] != keras_version:
        raise BackboneError(
            f"Ray worker {row['worker']} has other backbone weights or another Keras version (fingerprint "
            f"{row['fingerprint']}, Keras {row['keras_version']}) than this cache ({fingerprint}, Keras "
            f"{keras_version}); install the same weights and versions on every node. Nothing it made was written."
        )


DEVICE_BATCHES_PER_CALL = 4  # backbone batches per actor call: fewer Ray round trips, the device kept busy inside


def clips_per_call(batch_size: int, frames: int, clips_per_block: int = CLIPS_PER_DECODE_TASK) -> int:
    """Clips per actor call: about DEVICE_BATCHES_PER_CALL backbone batches of frames, in whole decode blocks.

    Ray Data bundles whole blocks (``clips_per_block`` rows, one per decode task) for an actor and
    cuts them into calls of this many rows: 7 clips per call from blocks of 4 made calls of 7 and
    1, the 1-clip call a padded backbone batch of its own.
    """
    clips = max(1, -(-DEVICE_BATCHES_PER_CALL * batch_size // frames))
    return -(-clips // clips_per_block) * clips_per_block


def build(
    rows: list[dict],
    plan_: Plan,
    *,
    decode_kwargs: dict,
    embedder_kwargs: dict,
    clips_per_call: int,
    decode_fn=None,
    embedder=None,
    actor_cpus: float | None = None,
    clips_per_decode_task: int = CLIPS_PER_DECODE_TASK,
    decode_cpus: float = 1,
):
    """The Ray Data pipeline over keyed ``rows`` (key, path, label, split): decode tasks -> the actor pool.

    ``decode_fn`` and ``embedder`` default to :func:`decode_batch` and :class:`ClipEmbedder`
    (bench/ray_bench.py swaps in stand-ins to simulate a device). Each actor reserves ``actor_cpus``
    CPUs (default: 1 beside its GPUs, half a CPU on a CPU-only cluster so decoding keeps a share).
    """
    import ray.data
    from ray.data import ActorPoolStrategy

    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // clips_per_decode_task)))
    ds = ds.map_batches(
        decode_fn or decode_batch,
        batch_size=clips_per_decode_task,
        batch_format="numpy",
        num_cpus=decode_cpus,
        fn_kwargs=decode_kwargs,
    )
    return ds.map_batches(
        embedder or ClipEmbedder,
        batch_size=clips_per_call,
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=plan_.num_workers, max_size=plan_.num_workers),
        num_gpus=plan_.gpus_per_worker,
        num_cpus=actor_cpus if actor_cpus is not None else (1 if plan_.gpus_per_worker else 0.5),
        fn_constructor_kwargs=embedder_kwargs,
    )


def consume(ds, sink, dtype, fingerprint: str | Callable[[], str], keras_version: str, stats, progress=None) -> None:
    """Rows of ``ds`` on the driver: checked, each key once, handed to ``sink`` (a BackgroundWriter).

    ``fingerprint`` is the reference every row is checked against, or a function returning it,
    called once when the first rows have come and before any is written (it may raise).
    """
    seen: set[str] = set()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
        if callable(fingerprint):
            fingerprint = fingerprint()
        for i in range(len(batch["key"])):
            row = {name: batch[name][i] for name in batch}
            key = str(row["key"])
            if key in seen:  # a batch redone by a restarted actor
                continue
            label, split = int(row["label"]), str(row["split"])
            if row["error"]:
                sink.put(ClipRecord(key, label, split, 0, error=str(row["error"])))
            else:
                check_worker(row, fingerprint, keras_version)
                mask = np.asarray(row["mask"], bool)
                feats = np.asarray(row["features"], dtype)
                check_clip_finite(key, feats, mask, dtype)
                timing = dict(times=np.asarray(row["time"], np.float32), duration=row["duration"], fps=row["fps"])
                sink.put(ClipRecord(key, label, split, int(row["n_frames"]), feats, mask, **timing))
                stats.clips += 1
                stats.frames += int(mask.sum())
                stats.infer_seconds += float(row["infer_seconds"])
                if int(row.get("damaged_from", -1)) >= 0:
                    stats.damaged[key] = int(row["damaged_from"])
            seen.add(key)
            if progress is not None:
                progress(1)


class RayEngine:
    """The backbone runs on a Ray cluster's actors; this process (the driver) writes (see the module's docstring)."""

    name = "ray"

    def check(self) -> None:
        """Without Ray Data installed: a sentence saying how to install it, before any work."""
        import_ray()

    def source(self, backbone: Backbone, size: int, opts: ExtractOptions) -> FrameSource:
        """No network on the driver: what the cache records, the fingerprint computed on a thread."""
        return DriverBackbone(backbone, size, opts.weights, opts.seed, opts.batch_size, opts.precision)

    def run(self, work: Work, writer: CacheWriter) -> Stats:
        """Extract ``work.todo`` on the cluster; the driver writes every row through ``writer``.

        ``work.fingerprint()`` gives the driver's weights fingerprint, checked against the cache: called
        when the first rows come back, before anything is written.
        """
        ray = import_ray()
        opts, source, todo = work.opts, work.source, work.todo
        keras_version = import_keras().__version__
        started_ray = connect(opts.ray_address)
        try:
            quiet_ray_data()
            p = plan(opts.num_workers, opts.gpus_per_worker)
            rows = [
                {
                    "key": r.video,
                    "path": str(r.path.resolve()),
                    "label": work.dataset.label_index(r.label),
                    "split": r.split,
                }
                for r in todo
            ]
            ds = build(
                rows,
                p,
                decode_kwargs=dict(
                    frames=opts.frames, size=source.size, sampling=opts.sampling, fps=opts.fps, decoder=opts.decoder
                ),
                embedder_kwargs=dict(
                    backbone=source.backbone,
                    size=source.size,
                    weights=opts.weights,
                    seed=opts.seed,
                    batch_size=opts.batch_size,
                    precision=opts.precision,
                    dtype=opts.dtype,
                ),
                clips_per_call=clips_per_call(source.batch_size, opts.frames),
            )
            stats = Stats()
            desc = f"extract {source.backbone.name} on {p.num_workers} Ray worker(s)"
            with writing_with_progress(writer, len(todo), desc, opts.quiet) as (bar, sink):
                consume(ds, sink, source.cache_dtype(opts.dtype), work.fingerprint, keras_version, stats, bar.update)
            return stats
        finally:
            if started_ray:
                ray.shutdown()


def quiet_ray_data() -> None:
    """No Ray Data progress bars or execution banners on the driver: featpipe's own bar counts clips."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    detectors = getattr(ctx, "issue_detectors_config", None)  # its memory hints are about Ray's scheduling, not ours
    if detectors is not None and hasattr(detectors, "high_memory_detector_config"):
        detectors.high_memory_detector_config.detection_time_interval_s = -1
    logging.getLogger("ray.data").setLevel(logging.ERROR)


ENGINE = RayEngine()
