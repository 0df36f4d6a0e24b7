"""Reading a feature cache for training and evaluation.

Two ways to feed a model, chosen automatically from the cache size (``--in-memory`` /
``--stream`` override):
  * in memory: the rows of a split are read once into float32 arrays;
  * streaming: a ``keras.utils.PyDataset`` (:data:`H5Batches`) reads windows of a few batches
    from HDF5 in large reads (shuffled blocks of neighbouring rows, shuffled again inside each
    window, a new order every epoch), so the features never need to fit in RAM.
Both yield the same inputs: ``{"features": (B, T, *F), "mask": (B, T) bool}``, features float32
(``H5Batches(dtype=None)``, as training uses it, keeps the cache's dtype: the model's float32
input casts float16 to exactly the values held in memory, faster than NumPy does).
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featpipe.cache import CacheConfig, open_h5, parse_shard_path, read_features
from featpipe.errors import CacheError, FeatpipeError

# Caches up to this fraction of physical memory (as float32) are trained from memory by default.
IN_MEMORY_FRACTION = 0.25
_SCAN_ROWS = 256  # rows per read when scanning the whole cache


@dataclass
class CacheIndex:
    """Everything about a cache except the features themselves (small, always in memory)."""

    path: Path
    config: CacheConfig
    labels: np.ndarray  # (N,) int
    splits: np.ndarray  # (N,) str
    videos: np.ndarray  # (N,) str
    mask: np.ndarray  # (N, T) bool
    features_nbytes_f32: int  # size of all features as float32

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.config.class_names

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)


def resolve_cache(cache: str | Path | None, cache_dir: str | Path = "cache") -> Path:
    """The cache to use: the given file, or the single .h5 in ``cache_dir`` (shard files do not count)."""
    if cache is not None:
        return Path(cache)
    folder = Path(cache_dir)
    everything = sorted(folder.glob("*.h5")) if folder.is_dir() else []
    found = [p for p in everything if parse_shard_path(p) is None]
    if not found and everything:
        names = ", ".join(p.name for p in everything)
        raise CacheError(f"{folder}/ holds only shards ({names}); combine them with "
                         f"`featpipe merge --output {parse_shard_path(everything[0])[0]}` first.")
    if not found:
        raise CacheError(f"No cache (.h5) found in '{folder}'. Run `featpipe extract` first, or pass --cache FILE.")
    if len(found) > 1:
        names = ", ".join(str(p) for p in found)
        raise CacheError(f"Several caches in '{folder}' ({names}); choose one with --cache FILE.")
    return found[0]


def cache_fingerprint(path: str | Path) -> str:
    """A short hash of a cache's attributes and clip index (video, label, split, mask)."""
    digest = hashlib.sha256()
    with open_h5(Path(path)) as f:
        for key in sorted(f.attrs):
            digest.update(f"{key}={np.asarray(f.attrs[key]).tolist()!r}".encode())
        for name in ("video", "label", "split", "mask"):
            ds = f[name]
            if ds.dtype.kind == "O":  # variable-length strings: hash the text, not object pointers
                digest.update("\n".join(ds.asstr()[()]).encode())
            else:
                digest.update(np.ascontiguousarray(ds[()]).tobytes())
        digest.update(str(f["features"].shape).encode())
    return digest.hexdigest()[:16]


def open_index(path: str | Path) -> CacheIndex:
    """Open and validate a cache; read everything but the features."""
    path = Path(path)
    with open_h5(path) as f:
        config = CacheConfig.from_attrs(dict(f.attrs))
        for name in ("features", "mask", "label", "split", "video"):
            if name not in f:
                raise CacheError(f"'{path}' has no '{name}' dataset; it is not a complete featpipe cache. Re-run `featpipe extract`.")
        features = f["features"]
        index = CacheIndex(
            path=path, config=config, labels=f["label"][:].astype(np.int64), splits=f["split"].asstr()[:].astype(str),
            videos=f["video"].asstr()[:].astype(str), mask=f["mask"][:].astype(bool),
            features_nbytes_f32=int(np.prod(features.shape)) * 4,
        )
    if len(index.labels) == 0:
        raise CacheError(f"'{path}' holds no clips. Re-run `featpipe extract` on a dataset with decodable videos.")
    if index.labels.min() < 0 or index.labels.max() >= len(config.class_names):
        raise CacheError(f"'{path}' has labels outside its {len(config.class_names)} classes; the cache is damaged.")
    return index


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def choose_stream(index: CacheIndex, stream: bool | None) -> bool:
    """True to stream from disk: as asked, else when the features exceed a quarter of RAM."""
    if stream is not None:
        return stream
    return index.features_nbytes_f32 > IN_MEMORY_FRACTION * physical_memory()


def _scan(path: Path, rows: np.ndarray):
    """Yield (rows, features float32, mask) in file order, _SCAN_ROWS at a time."""
    rows = np.sort(rows)
    with open_h5(path) as f:
        feats, masks = f["features"], f["mask"]
        for start in range(0, len(rows), _SCAN_ROWS):
            block = rows[start:start + _SCAN_ROWS]
            lo, hi = int(block[0]), int(block[-1]) + 1
            # read_features: a row failing its checksum is a DamagedCacheError naming the clip
            if hi - lo == len(block):  # contiguous: one slice read
                x, m = read_features(f, path, slice(lo, hi)), masks[lo:hi]
            else:
                x, m = read_features(f, path, block), masks[block]
            yield block, np.asarray(x, dtype=np.float32), np.asarray(m, dtype=bool)


def _refuse_non_finite(index: CacheIndex, block: np.ndarray, x: np.ndarray) -> None:
    bad = ~np.isfinite(x.reshape(len(block), -1)).all(axis=1)
    if bad.any():
        video = index.videos[block[np.flatnonzero(bad)[0]]]
        raise CacheError(
            f"The features of '{video}' (and {int(bad.sum()) - 1} more in that block) in '{index.path}' are NaN or "
            f"infinite; re-extract with --dtype float32 into a new --output file."
        )


def check_finite(index: CacheIndex, rows: np.ndarray) -> None:
    """Refuse a cache whose features hold NaN or infinity in the given rows (one streaming pass)."""
    for block, x, _ in _scan(index.path, rows):
        _refuse_non_finite(index, block, x)


def feature_stats(index: CacheIndex, rows: np.ndarray, check: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and variance over the REAL (unmasked) frames of ``rows``, in float64.

    With ``check``, the same single pass over ``rows`` and ``check`` also refuses NaN or infinite
    features in any of them (so training reads the cache once before fitting, not twice).
    """
    count = 0
    total = None
    total_sq = None
    scan_rows = rows if check is None else np.union1d(rows, check)
    for block, x, m in _scan(index.path, scan_rows):
        if check is not None:
            _refuse_non_finite(index, block, x)
            keep = np.isin(block, rows)
            x, m = x[keep], m[keep]
        real = x[m].astype(np.float64)  # (frames, *F)
        if total is None:
            total = np.zeros(x.shape[2:])
            total_sq = np.zeros(x.shape[2:])
        total += real.sum(axis=0)
        total_sq += np.square(real).sum(axis=0)
        count += len(real)
    if not count:
        raise FeatpipeError("The training split has no real frames; re-extract the cache.")
    mean = total / count
    var = np.maximum(total_sq / count - np.square(mean), 0.0)
    return mean.astype(np.float32), var.astype(np.float32)


def load_rows(index: CacheIndex, rows: np.ndarray) -> tuple[dict, np.ndarray]:
    """Read ``rows`` into memory (in the given order): ({"features", "mask"}, labels)."""
    rows = np.asarray(rows)
    order = np.argsort(rows)
    feats = np.empty((len(rows), *_row_shape(index)), dtype=np.float32)
    masks = np.empty((len(rows), index.mask.shape[1]), dtype=bool)
    pos = 0
    sorted_rows = rows[order]
    for block, x, m in _scan(index.path, sorted_rows):
        feats[order[pos:pos + len(block)]] = x
        masks[order[pos:pos + len(block)]] = m
        pos += len(block)
    return {"features": feats, "mask": masks}, index.labels[rows]


def _row_shape(index: CacheIndex) -> tuple[int, ...]:
    return (index.config.frames, *index.config.feature_shape)


# glibc malloc thresholds (mmap, trim) while streaming on TensorFlow; see _streaming_malloc.
MALLOC_THRESHOLDS = (8 << 20, 16 << 20)
_TF_MALLOC = (128 << 10, 128 << 10)  # what TensorFlow's generator op pins (mmap); glibc's default (trim)
_mallopt = None


def _mallopt_fn():
    """glibc's ``mallopt`` when Keras runs on TensorFlow under Linux, else None (looked up once)."""
    global _mallopt
    if _mallopt is None:
        _mallopt = False
        if sys.platform.startswith("linux") and sys.modules.get("tensorflow") is not None:
            try:
                import ctypes

                import keras

                if keras.backend.backend() == "tensorflow":
                    fn = ctypes.CDLL(None).mallopt
                    fn.argtypes, fn.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
                    _mallopt = fn
            except (OSError, AttributeError, ImportError):
                pass
    return _mallopt or None


def _streaming_malloc(on: bool) -> bool:
    """Undo (``on``) or put back TensorFlow's pinning of glibc's mmap threshold at 128 KiB.

    Keras feeds a PyDataset to TensorFlow through ``tf.data.Dataset.from_generator``, whose op calls
    ``mallopt(M_MMAP_THRESHOLD, 128 KiB)`` (a mitigation for a Python 3.11 leak). From then on every
    tensor of 128 KiB or more in the training step (gradients, activations, the batch) is a fresh
    ``mmap``, page-faulted in and unmapped again: on bench/train_bench.py that was 8.7 million page
    faults and more than twice the CPU time per epoch (13.5 s instead of 6). The in-memory path never
    creates that op. An 8 MiB mmap threshold and 16 MiB trim threshold let glibc's arenas reuse that
    memory (0.46 million faults); larger values cost more peak memory for no more speed, and smaller
    trim thresholds bring the faults back. Returns whether anything was set (TensorFlow on glibc).
    """
    fn = _mallopt_fn()
    if fn is None or MALLOC_THRESHOLDS is None:
        return False
    mmap_threshold, trim_threshold = MALLOC_THRESHOLDS if on else _TF_MALLOC
    fn(-3, mmap_threshold)  # M_MMAP_THRESHOLD
    fn(-1, trim_threshold)  # M_TRIM_THRESHOLD
    return True


class _H5BatchesImpl:
    """Batches read straight from the HDF5 cache, with few large reads and bounded memory.

    Rows are served in ``self._order`` (positions into ``rows``): the given order, or with
    ``shuffle`` a new permutation every epoch built for reading speed ("shuffled chunk order"):

      1. the rows, in file order, are cut into blocks of ``block_rows`` neighbours, at a random
         offset each epoch (so the blocks differ from epoch to epoch);
      2. the order of the blocks is shuffled;
      3. the rows inside each window of ``window_batches`` batches are shuffled.

    Every row is served exactly once per epoch, and a batch mixes rows from about
    ``window_batches * batch_size / block_rows`` places in the file. A window is read once, with
    one HDF5 read per run of neighbouring rows (instead of one read per row), kept in the file's
    dtype, and its batches are gathered from it and converted to ``dtype``. At most
    ``max_windows`` windows are held, so memory is bounded by ``max_windows * window_batches *
    batch_size`` rows whatever the cache size (plus the batches Keras queues).

    The order is a function of ``seed`` and the epoch alone, so batches are the same whichever
    worker thread reads them. Keras must not reorder the batches: fit with ``shuffle=False``
    (reordering stays correct, only slower, since windows are then re-read).
    The public name ``H5Batches`` is this class mixed into ``keras.utils.PyDataset``, created on
    first use so that importing featpipe does not import Keras.
    """

    MAX_GAP = 2  # rows between two wanted rows that are read and dropped rather than split into two reads

    def __init__(self, path: str | Path, rows: np.ndarray, labels: np.ndarray, batch_size: int,
                 shuffle: bool = False, seed: int = 0, sample_weight: np.ndarray | None = None,
                 block_rows: int = 16, window_batches: int = 8, max_windows: int = 2,
                 dtype: str | None = "float32", **kwargs):
        super().__init__(**kwargs)
        self.path = Path(path)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = np.asarray(labels)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.sample_weight = None if sample_weight is None else np.asarray(sample_weight)
        self.block_rows = max(1, int(block_rows))
        self.window_rows = self.batch_size * max(1, int(window_batches))
        self.max_windows = max(1, int(max_windows))
        self.dtype = None if dtype is None else np.dtype(dtype)
        self._by_file = np.argsort(self.rows, kind="stable")
        self._rng = np.random.default_rng(seed)
        self._init_state()
        with open_h5(self.path) as f:
            self._masks = f["mask"][()].astype(bool)[self.rows] if len(self.rows) else np.zeros((0, 0), bool)
        self._epoch = 0
        self._order = self._plan()
        self._malloc_set = False

    def _init_state(self) -> None:
        self._file = None
        self._lock = threading.Lock()
        self._window_locks: dict = {}
        self._windows: OrderedDict = OrderedDict()  # (epoch, window) -> (features, where)

    def __getstate__(self):  # for use_multiprocessing: locks, the open file and the windows stay behind
        state = self.__dict__.copy()
        for key in ("_file", "_lock", "_window_locks", "_windows"):
            state.pop(key, None)
        return state

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self._init_state()

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    @property
    def held_rows(self) -> int:
        """Rows of features held in memory right now (the windows cached)."""
        with self._lock:
            return sum(len(x) for x, _ in self._windows.values())

    def _plan(self) -> np.ndarray:
        """This epoch's order: positions into ``rows`` (see the class docstring)."""
        n = len(self.rows)
        if not self.shuffle or n == 0:
            return np.arange(n)
        b = self.block_rows
        offset = int(self._rng.integers(b)) if n > b else 0
        blocks = np.split(self._by_file, np.arange(offset or b, n, b))
        order = np.concatenate([blocks[k] for k in self._rng.permutation(len(blocks))])
        for start in range(0, n, self.window_rows):
            self._rng.shuffle(order[start:start + self.window_rows])
        return order

    def _h5(self):
        if self._file is None:
            self._file = open_h5(self.path)
        return self._file

    def _read_window(self, w: int):
        """Window ``w``'s rows in file order (file dtype), and where each entry of the window lies in it."""
        # once per window (TensorFlow pins the threshold when the epoch's generator op is created)
        self._malloc_set = _streaming_malloc(True) or self._malloc_set
        rows = self.rows[self._order[w * self.window_rows:(w + 1) * self.window_rows]]
        by_file = np.argsort(rows, kind="stable")
        wanted = rows[by_file]
        with self._lock:
            h5 = self._h5()
            feats = h5["features"]
        x = np.empty((len(wanted), *feats.shape[1:]), dtype=feats.dtype)
        cuts = np.flatnonzero(np.diff(wanted) > 1 + self.MAX_GAP) + 1
        for start, end in zip((0, *cuts), (*cuts, len(wanted))):
            lo, hi = int(wanted[start]), int(wanted[end - 1]) + 1
            if hi - lo == end - start:  # neighbours: straight into place
                read_features(h5, self.path, np.s_[lo:hi], out=x, dest_sel=np.s_[start:end])
            else:  # small gaps (rows of other splits) or repeats: read the span, keep the wanted rows
                x[start:end] = read_features(h5, self.path, np.s_[lo:hi])[wanted[start:end] - lo]
        where = np.empty(len(rows), dtype=np.int64)
        where[by_file] = np.arange(len(rows))
        return x, where

    def _window(self, w: int):
        key = (self._epoch, w)
        with self._lock:
            if key in self._windows:
                self._windows.move_to_end(key)
                return self._windows[key]
            lock = self._window_locks.setdefault(key, threading.Lock())
        with lock:  # one thread reads a window; the others wanting it wait for it
            with self._lock:
                hit = self._windows.get(key)
            if hit is None:
                hit = self._read_window(w)
                with self._lock:
                    self._windows[key] = hit
                    while len(self._windows) > self.max_windows:
                        old, _ = self._windows.popitem(last=False)
                        self._window_locks.pop(old, None)
            return hit

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(f"batch {i} out of range ({len(self)} batches)")
        start = i * self.batch_size
        pick = self._order[start:start + self.batch_size]
        w, k = divmod(start, self.window_rows)
        x, where = self._window(w)
        x = x[where[k:k + len(pick)]]
        if self.dtype is not None and x.dtype != self.dtype:
            x = x.astype(self.dtype)
        inputs = {"features": x, "mask": self._masks[pick]}
        y = self.labels[pick]
        if self.sample_weight is not None:
            return inputs, y, self.sample_weight[pick]
        return inputs, y

    def on_epoch_end(self) -> None:
        with self._lock:
            self._windows.clear()
            self._window_locks.clear()
        if self.shuffle:
            self._epoch += 1
            self._order = self._plan()

    def close(self) -> None:
        """Close the file, drop the windows, and give TensorFlow's malloc setting back."""
        with self._lock:
            self._windows.clear()
            if self._file is not None:
                self._file.close()
                self._file = None
        if self._malloc_set:
            _streaming_malloc(False)
            self._malloc_set = False


_H5_BATCHES = None


def __getattr__(name: str):
    if name == "H5Batches":
        global _H5_BATCHES
        if _H5_BATCHES is None:
            import keras

            _H5_BATCHES = type("H5Batches", (_H5BatchesImpl, keras.utils.PyDataset), {"__module__": __name__})
        return _H5_BATCHES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------
# Temporal augmentation and projections fitted on the train split
# --------------------------------------------------------------------------------------------


def subset_positions(counts, frames: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Which steps of each clip a head of ``frames`` steps sees: ``(positions, keep)``, both ``(B, frames)``.

    ``counts`` are the clips' numbers of real frames (real frames come first in the cache). A clip
    with at most ``frames`` real frames keeps them all (``keep`` False after them). A longer clip:

    * ``rng is None`` (evaluation, predict): the fixed uniform positions of
      :func:`featpipe.video.sample_indices` over its real frames;
    * with an ``rng`` (training): the real frames are cut into ``frames`` equal segments and one
      frame is drawn in each, so positions are sorted, distinct, real, and differ between draws.

    The NumPy statement of what :class:`featpipe.models.FrameSubset` does inside a model (which is
    where training applies it, so that predict and evaluate need nothing but the model file).
    """
    n = np.asarray(counts, dtype=np.int64).reshape(-1, 1)
    k = int(frames)
    i = np.arange(k, dtype=np.int64).reshape(1, -1)
    if rng is not None:
        lo, hi = (i * n) // k, ((i + 1) * n) // k
        width = np.maximum(hi - lo, 1)
        long_pos = lo + np.minimum((rng.random(lo.shape) * width).astype(np.int64), width - 1)
    elif k == 1:
        long_pos = np.zeros_like(i + n)
    else:
        long_pos = (2 * i * (n - 1) + (k - 1)) // (2 * (k - 1))
    pos = np.where(n <= k, np.where(i < n, i, 0), long_pos)
    return pos, i < np.minimum(n, k)


def pca_whitening(index: CacheIndex, rows: np.ndarray, mean: np.ndarray, variance: np.ndarray,
                  components: int) -> np.ndarray:
    """A ``(D, components)`` matrix projecting standardised features on their first principal
    axes, scaled to unit variance (PCA whitening), fitted on the REAL frames of ``rows`` only."""
    std = np.sqrt(np.maximum(variance.astype(np.float64), 1e-12))
    cov = None
    count = 0
    for _, x, m in _scan(index.path, rows):
        z = (x[m].astype(np.float64) - mean) / std
        cov = z.T @ z if cov is None else cov + z.T @ z
        count += len(z)
    if cov is None or count < 2:
        raise FeatpipeError("PCA needs at least two real train frames; re-extract the cache or leave out --pca.")
    return _whitening(cov / (count - 1), components)


def pca_from_frames(z: np.ndarray, components: int) -> np.ndarray:
    """:func:`pca_whitening` for standardised frames already in memory, ``(frames, D)``."""
    if len(z) < 2:
        raise FeatpipeError("PCA needs at least two real train frames; re-extract the cache or leave out --pca.")
    z = np.asarray(z, dtype=np.float64)
    return _whitening(z.T @ z / (len(z) - 1), components)


def _whitening(cov: np.ndarray, components: int) -> np.ndarray:
    if components > cov.shape[0]:
        raise FeatpipeError(f"pca must be at most the feature size ({cov.shape[0]}); got {components}.")
    values, vectors = np.linalg.eigh(cov)
    top = np.argsort(values)[::-1][:components]
    vectors = vectors[:, top] * np.sign(vectors[:1, top] + 1e-300)  # a fixed sign per axis: reproducible
    return (vectors / np.sqrt(np.maximum(values[top], 1e-6))).astype(np.float32)
