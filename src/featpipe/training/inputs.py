"""Reading a feature cache for training and evaluation.

Two ways to feed a model, chosen automatically from the cache size (``--in-memory`` /
``--stream`` override):
  * in memory: the rows of a split are read once into float32 arrays;
  * streaming: a ``keras.utils.PyDataset`` (:class:`featpipe.training.streaming.H5Batches`) reads windows
    of a few batches from HDF5 in large reads (shuffled blocks of neighbouring rows, shuffled again inside each
    window, a new order every epoch), so the features never need to fit in RAM.
Both yield the same inputs: ``{"features": (B, T, *F), "mask": (B, T) bool}``, features float32
(``H5Batches(dtype=None)``, as training uses it, keeps the cache's dtype: the model's float32
input casts float16 to exactly the values held in memory, faster than NumPy does).
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featpipe.cache.finite import non_finite_rows
from featpipe.cache.reader import check_masks, open_h5, read_features
from featpipe.cache.schema import CacheConfig
from featpipe.cache.shards import parse_shard_path
from featpipe.errors import CacheError, FeatpipeError
from featpipe.runtime.devices import physical_memory

# Caches up to this fraction of physical memory (as float32) are trained from memory by default.
IN_MEMORY_FRACTION = 0.25
_SCAN_ROWS = 256  # rows per read when scanning the whole cache


@dataclass
class CacheIndex:
    """Everything about a cache except the features themselves (small, always in memory).

    ``file`` is the cache as :func:`open_index` opened it, kept open until :meth:`close`: every
    read through this index (statistics, rows, streamed batches, the fingerprint) reads that one
    file, so an extraction or merge that replaces the cache meanwhile changes nothing for this
    reader (its part files are kept while it is open, see featpipe.cache.lock), and rows never shift.
    """

    path: Path
    config: CacheConfig
    labels: np.ndarray  # (N,) int
    splits: np.ndarray  # (N,) str
    videos: np.ndarray  # (N,) str
    mask: np.ndarray  # (N, T) bool
    features_nbytes_f32: int  # size of all features as float32
    file: object = field(default=None, repr=False, compare=False)  # the open cache (None: reopened per read)

    def close(self) -> None:
        """Close the cache file (reads after this reopen the file at ``path``)."""
        f, self.file = self.file, None
        if f is not None:
            f.close()

    def __enter__(self) -> "CacheIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def opened(self):
        """A context giving the open cache: this index's own file, or the file at ``path`` opened for the block."""
        return contextlib.nullcontext(self.file) if self.file is not None else open_h5(self.path)

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
        raise CacheError(
            f"{folder}/ holds only shards ({names}); combine them with "
            f"`featpipe merge --output {parse_shard_path(everything[0])[0]}` first."
        )
    if not found:
        raise CacheError(f"No cache (.h5) found in '{folder}'. Run `featpipe extract` first, or pass --cache FILE.")
    if len(found) > 1:
        names = ", ".join(str(p) for p in found)
        raise CacheError(f"Several caches in '{folder}' ({names}); choose one with --cache FILE.")
    return found[0]


def cache_fingerprint(path: str | Path | CacheIndex) -> str:
    """A short hash of a cache's attributes and clip index (video, label, split, mask); given a
    :class:`CacheIndex`, of the file it holds open."""
    digest = hashlib.sha256()
    with path.opened() if isinstance(path, CacheIndex) else open_h5(Path(path)) as f:
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
    """Open and validate a cache; read everything but the features, and keep the file open for them.

    Close the index (or use it in a ``with``) when done. A damaged mask (it fails its checksum, or
    is not real frames first) is a DamagedCacheError naming the clips.
    """
    path = Path(path)
    f = open_h5(path)
    try:
        config = CacheConfig.from_attrs(dict(f.attrs))
        for name in ("features", "mask", "label", "split", "video"):
            if name not in f:
                raise CacheError(
                    f"'{path}' has no '{name}' dataset; it is not a complete featpipe cache. Re-run `featpipe extract`."
                )
        features = f["features"]
        mask = f["mask"][:]
        check_masks(f, path, mask)
        index = CacheIndex(
            path=path,
            config=config,
            labels=f["label"][:].astype(np.int64),
            splits=f["split"].asstr()[:].astype(str),
            videos=f["video"].asstr()[:].astype(str),
            mask=mask.astype(bool),
            features_nbytes_f32=int(np.prod(features.shape)) * 4,
            file=f,
        )
    except BaseException:
        f.close()
        raise
    if len(index.labels) == 0:
        index.close()
        raise CacheError(f"'{path}' holds no clips. Re-run `featpipe extract` on a dataset with decodable videos.")
    if index.labels.min() < 0 or index.labels.max() >= len(config.class_names):
        index.close()
        raise CacheError(f"'{path}' has labels outside its {len(config.class_names)} classes; the cache is damaged.")
    return index


def choose_stream(index: CacheIndex, stream: bool | None) -> bool:
    """True to stream from disk: as asked, else when the features exceed a quarter of RAM."""
    if stream is not None:
        return stream
    return index.features_nbytes_f32 > IN_MEMORY_FRACTION * physical_memory()


def _scan(index: CacheIndex, rows: np.ndarray):
    """Yield (rows, features float32, mask) in file order, _SCAN_ROWS at a time."""
    rows = np.sort(rows)
    path = index.path
    with index.opened() as f:
        masks = f["mask"]
        for start in range(0, len(rows), _SCAN_ROWS):
            block = rows[start : start + _SCAN_ROWS]
            lo, hi = int(block[0]), int(block[-1]) + 1
            # read_features: a row failing its checksum is a DamagedCacheError naming the clip
            if hi - lo == len(block):  # contiguous: one slice read
                x, m = read_features(f, path, slice(lo, hi)), masks[lo:hi]
            else:
                x, m = read_features(f, path, block), masks[block]
            yield block, np.asarray(x, dtype=np.float32), np.asarray(m, dtype=bool)


def _refuse_non_finite(index: CacheIndex, block: np.ndarray, x: np.ndarray) -> None:
    bad = non_finite_rows(x)
    if bad.any():
        video = index.videos[block[np.flatnonzero(bad)[0]]]
        raise CacheError(
            f"The features of '{video}' (and {int(bad.sum()) - 1} more in that block) in '{index.path}' are NaN or "
            f"infinite; re-extract with --dtype float32 into a new --output file."
        )


def check_finite(index: CacheIndex, rows: np.ndarray) -> None:
    """Refuse a cache whose features hold NaN or infinity in the given rows (one streaming pass)."""
    for block, x, _ in _scan(index, rows):
        _refuse_non_finite(index, block, x)


def feature_stats(
    index: CacheIndex, rows: np.ndarray, check: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and variance over the REAL (unmasked) frames of ``rows``, in float64.

    With ``check``, the same single pass over ``rows`` and ``check`` also refuses NaN or infinite
    features in any of them (so training reads the cache once before fitting, not twice).
    """
    count = 0
    total = None
    total_sq = None
    scan_rows = rows if check is None else np.union1d(rows, check)
    for block, x, m in _scan(index, scan_rows):
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
    for block, x, m in _scan(index, sorted_rows):
        feats[order[pos : pos + len(block)]] = x
        masks[order[pos : pos + len(block)]] = m
        pos += len(block)
    return {"features": feats, "mask": masks}, index.labels[rows]


def _row_shape(index: CacheIndex) -> tuple[int, ...]:
    return (index.config.frames, *index.config.feature_shape)


# --------------------------------------------------------------------------------------------
# Temporal augmentation and projections fitted on the train split
# --------------------------------------------------------------------------------------------


def subset_positions(counts, frames: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Which steps of each clip a head of ``frames`` steps sees: ``(positions, keep)``, both ``(B, frames)``.

    ``counts`` are the clips' numbers of real frames (real frames come first in the cache). A clip
    with at most ``frames`` real frames keeps them all (``keep`` False after them). A longer clip:

    * ``rng is None`` (evaluation, predict): the fixed uniform positions of
      :func:`featpipe.video.decode.sample_indices` over its real frames;
    * with an ``rng`` (training): the real frames are cut into ``frames`` equal segments and one
      frame is drawn in each, so positions are sorted, distinct, real, and differ between draws.

    The NumPy statement of what :class:`featpipe.training.heads.layers.FrameSubset` does inside a model (which is
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


def pca_whitening(
    index: CacheIndex, rows: np.ndarray, mean: np.ndarray, variance: np.ndarray, components: int
) -> np.ndarray:
    """A ``(D, components)`` matrix projecting standardised features on their first principal
    axes, scaled to unit variance (PCA whitening), fitted on the REAL frames of ``rows`` only."""
    std = np.sqrt(np.maximum(variance.astype(np.float64), 1e-12))
    cov = None
    count = 0
    for _, x, m in _scan(index, rows):
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
