"""What `featpipe extract` can be told (:class:`ExtractOptions`), every value checked once, for the CLI and the API."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from featpipe.backbones.hub import INSTALL as HUB_INSTALL
from featpipe.backbones.hub import hub_installed
from featpipe.backbones.registry import WEIGHTS_IMAGENET, get_backbone
from featpipe.cache.shards import parse_shard
from featpipe.errors import FeatpipeError, OptionError
from featpipe.names import DECODERS, DTYPES, ENGINES, PRECISIONS, SAMPLING
from featpipe.options import (
    check_choice,
    check_dir_option,
    check_file_option,
    check_float,
    check_int,
    split_list_options,
)
from featpipe.runtime import devices
from featpipe.runtime.devices import default_workers

MAX_SIZE = 1024  # largest square input: ImageNet backbones are trained at 224-600 px
MAX_FRAMES = 10_000  # frames per clip (sequence length)
MAX_BATCH = 65_536  # frames per forward pass (a memory check below also applies)
MAX_WORKERS = 256
MAX_FPS = 1000.0  # frames per second sampled by time
MEMORY_SHARE = 0.8  # of physical memory the clips in flight and the batches may take


@dataclass(frozen=True)
class ExtractOptions:
    """Everything `featpipe extract` can be told. Defaults are the CLI's defaults.

    Every value is checked here, once, for the CLI and the Python API alike: a bad one raises
    ``OptionError`` naming the parameter (the CLI shows it as its flag) before any work starts.
    """

    backbone: str = "inceptionv3"  # registry name (featpipe.backbones.registry.REGISTRY)
    data: str | Path | None = None  # dataset folder (layout auto-detected); None = "data" unless csv is given
    csv: str | Path | None = None  # or a CSV with video_name,tag[,split] (not together with data)
    cache_dir: str | Path = "cache"  # the cache is <cache_dir>/<backbone>.h5 ...
    output: str | Path | None = None  # ... unless an explicit file is given
    frames: int = 20  # sequence length T (1..MAX_FRAMES)
    sampling: str = "uniform"  # "uniform" over the whole clip, or "first" N frames
    fps: float | None = None  # sample by time instead: the frames on screen at 0, 1/fps, 2/fps, ... (up to `frames`)
    decoder: str = "auto"  # "auto"/"pyav": seek to the frames kept; "opencv": read every frame (the same frames)
    size: int | None = None  # square input size (backbone minimum..MAX_SIZE); None = the backbone's native size
    weights: str = WEIGHTS_IMAGENET  # "imagenet", "none" (deterministic random) or a weights file
    seed: int = 0  # seed of the random network for weights="none"
    dtype: str = "float16"  # storage dtype of features
    batch_size: int | None = None  # frames per forward pass; None = sized from the device's free memory
    precision: str = "float32"  # backbone compute: float32, mixed_float16 or mixed_bfloat16 (storage stays `dtype`)
    workers: int | None = None  # decode threads; None = from the CPU count
    val_fraction: float = 0.15  # for layouts without given splits
    test_fraction: float = 0.15
    split_seed: int = 1337
    fold: int = 1  # UCF101 split lists
    retry_failed: bool = False  # re-try clips recorded as failed by an earlier run (a changed file is always retried)
    strict: bool = False  # any failed clip makes the run fail (after writing the cache)
    quiet: bool = False  # no progress bar
    # "I/N": only the clips whose key hashes to shard I of N, into <cache stem>.shard-I-of-N.h5
    # beside the cache (own journal and lock); `featpipe merge` combines the N shards
    shard: str | None = None
    # where the backbone runs: "local" (this process) or "ray" (a Ray cluster; needs `pip install "featpipe[ray]"`)
    engine: str = "local"
    # ray: the cluster's address (host:port); None = RAY_ADDRESS, the one `ray start` began here, or a new local Ray
    ray_address: str | None = None
    num_workers: int | None = None  # ray: backbone actors; None = one per GPU (one per node without GPUs)
    gpus_per_worker: float | None = None  # ray: GPUs each actor reserves; None = 1 if the cluster has GPUs, else 0

    def __post_init__(self):
        split_list_options(self)
        self.validate()

    @property
    def sampling_label(self) -> str:
        """The sampling as the cache records it: ``uniform``, ``first`` or ``fps=F``."""
        return f"fps={float(self.fps):g}" if self.fps is not None else self.sampling

    @property
    def data_folder(self) -> str | Path | None:
        """The dataset folder to index: ``data``, or "data" when neither it nor ``csv`` is given."""
        return self.data if self.data is not None or self.csv is not None else "data"

    def validate(self) -> None:
        """Raise OptionError (naming the parameter) for any value out of range or of the wrong kind."""
        if self.data is not None and self.csv is not None:
            raise OptionError(
                "csv",
                "cannot be combined with a data folder; give either a dataset folder or a "
                "CSV file (its paths are relative to the CSV's own folder), not both.",
            )
        if not isinstance(self.backbone, str):
            raise OptionError("backbone", f"must be a backbone name, got {self.backbone!r}.")
        backbone = get_backbone(self.backbone)
        if self.output is None:  # the cache goes into cache_dir (with output given, cache_dir is not used)
            check_dir_option("cache_dir", self.cache_dir)
        check_file_option("output", self.output, optional=True)
        check_int("frames", self.frames, 1, MAX_FRAMES)
        check_chunk_frames(backbone, self.frames)
        if backbone.extra == "hub" and not hub_installed():
            raise OptionError(
                "backbone",
                f"{backbone.name} needs keras-hub, which is not installed: run {HUB_INSTALL}.",
            )
        check_choice("sampling", self.sampling, SAMPLING)
        check_float("fps", self.fps, 0, MAX_FPS, low_open=True, optional=True)
        if self.fps is not None and self.sampling != "uniform":
            raise OptionError(
                "fps",
                f"samples by time and cannot be combined with --sampling {self.sampling}; leave --sampling "
                "at its default (uniform) or drop --fps.",
            )
        check_choice("decoder", self.decoder, DECODERS)
        check_int(
            "size",
            self.size,
            backbone.min_size,
            MAX_SIZE,
            optional=True,
            hint=f"({backbone.name} needs at least {backbone.min_size} pixels; its native size is "
            f"{backbone.default_size}; leave it unset for the native size.)",
        )
        check_int("seed", self.seed, 0)
        check_choice("dtype", self.dtype, DTYPES)
        check_int("batch_size", self.batch_size, 1, MAX_BATCH, optional=True)
        check_choice("precision", self.precision, PRECISIONS)
        check_int("workers", self.workers, 1, MAX_WORKERS, optional=True)
        check_float("val_fraction", self.val_fraction, 0, 1, high_open=True)
        check_float("test_fraction", self.test_fraction, 0, 1, high_open=True)
        if self.val_fraction + self.test_fraction >= 1:
            raise OptionError(
                "val_fraction",
                f"plus test_fraction must be below 1 so some clips are left to train on, "
                f"got {self.val_fraction!r} + {self.test_fraction!r}.",
            )
        check_int("split_seed", self.split_seed, 0)
        check_int("fold", self.fold, 1, 3)
        if self.shard is not None:
            try:
                parse_shard(self.shard)
            except FeatpipeError:
                raise OptionError(
                    "shard", f"must look like I/N with 1 <= I <= N, e.g. 2/4; got {self.shard!r}."
                ) from None
        validate_engine(self)
        self._check_memory(self.size or backbone.default_size)

    def _check_memory(self, size: int) -> None:
        """The decoded clips in flight and the frame batches must fit in memory: say what fits if not."""
        memory = MEMORY_SHARE * devices.physical_memory()
        frame = size * size * 3  # one decoded uint8 frame
        window = max(2 * (self.workers or default_workers()), 4) + 1  # clips decoded ahead, and the one being batched
        batch = self.batch_size or 32
        clips_bytes = window * self.frames * frame
        batch_bytes = 4 * batch * frame * 4  # pending + queued + on the device, as float32 after preprocessing
        if clips_bytes + batch_bytes <= memory:
            return
        gib = 1 << 30
        need = f"about {(clips_bytes + batch_bytes) / gib:.1f} GiB of memory, more than the {memory / gib:.1f} GiB"
        if clips_bytes >= batch_bytes:
            fit = int((memory - batch_bytes) // (window * frame))
            raise OptionError(
                "frames",
                f"of {self.frames} at {size} px with {window - 1} clips decoded ahead needs "
                f"{need} "
                f"this machine can spare; at most {max(fit, 0)} frames fit (or use fewer "
                "workers).",
            )
        fit = int((memory - clips_bytes) // (4 * frame * 4))
        raise OptionError(
            "batch_size",
            f"of {batch} frames at {size} px needs {need} this machine can spare; at most {max(fit, 0)} fit.",
        )


def check_chunk_frames(backbone, frames: int) -> None:
    """A video-native backbone embeds chunks of ``clip_frames`` (K) frames: --frames must be a multiple of K."""
    k = backbone.clip_frames
    if k <= 1 or frames % k == 0:
        return
    below, above = frames // k * k, (frames // k + 1) * k
    nearest = f"{below} or {above}" if below else f"{above}"
    raise OptionError(
        "frames",
        f"must be a multiple of {k} for {backbone.name}, which embeds {k} consecutive frames at once; got "
        f"{frames}: use {nearest} (a clip with fewer frames is still fine: its last frame is repeated to fill "
        "the chunk and masked).",
    )


MAX_RAY_WORKERS = 10_000
MAX_GPUS_PER_WORKER = 64


def validate_engine(opts: ExtractOptions) -> None:
    """The engine is known, and the Ray-only options are given only with --engine ray."""
    check_choice("engine", opts.engine, ENGINES)
    check_int("num_workers", opts.num_workers, 1, MAX_RAY_WORKERS, optional=True)
    check_float("gpus_per_worker", opts.gpus_per_worker, 0, MAX_GPUS_PER_WORKER, optional=True)
    if opts.ray_address is not None and not str(opts.ray_address).strip():
        raise OptionError("ray_address", "must be a cluster address such as 10.0.0.1:6379, got an empty string.")
    ray_only = [name for name in ("ray_address", "num_workers", "gpus_per_worker") if getattr(opts, name) is not None]
    if opts.engine != "ray" and ray_only:
        raise OptionError(ray_only[0], f"is for --engine ray only (the engine is '{opts.engine}').")
