"""Streaming batches from a feature cache, and the allocator setting that keeps them fast.

:class:`H5Batches` is the ``keras.utils.PyDataset`` that training uses when the features do not
fit in memory (``featpipe train --stream``). This module imports Keras at the top, so featpipe
imports it lazily (``featpipe.training.train`` does, inside the function that fits) and importing
:mod:`featpipe.training.inputs` never loads Keras.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import sys
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from featpipe.cache.reader import open_h5, read_features
from featpipe.runtime.keras_import import import_keras

keras = import_keras()

# glibc malloc thresholds (mmap, trim) while streaming on TensorFlow; see streaming_allocator.
MALLOC_THRESHOLDS = (8 << 20, 16 << 20)
TF_MALLOC = (128 << 10, 128 << 10)  # what TensorFlow's generator op pins (mmap); glibc's default (trim)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def _mallopt():
    """glibc's ``mallopt`` when Keras runs on TensorFlow under Linux, else None."""
    if not sys.platform.startswith("linux") or keras.backend.backend() != "tensorflow":
        return None
    try:
        fn = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return None
    fn.argtypes, fn.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return fn


def _set_malloc(fn, thresholds: tuple[int, int]) -> None:
    mmap_threshold, trim_threshold = thresholds
    fn(_M_MMAP_THRESHOLD, mmap_threshold)
    fn(_M_TRIM_THRESHOLD, trim_threshold)


class _KeepStreamingMalloc(keras.callbacks.Callback):
    """Sets the streaming thresholds again before every batch: TensorFlow pins its own whenever a
    generator op starts (each epoch's training iterator, and validation's when it streams too)."""

    def __init__(self, fn):
        super().__init__()
        self._fn = fn

    def on_train_batch_begin(self, batch, logs=None):
        _set_malloc(self._fn, MALLOC_THRESHOLDS)

    def on_test_batch_begin(self, batch, logs=None):
        _set_malloc(self._fn, MALLOC_THRESHOLDS)


@contextlib.contextmanager
def streaming_allocator(enabled: bool = True):
    """Around ``model.fit`` on :class:`H5Batches`: undo TensorFlow's pinning of glibc's mmap threshold.

    Yields the callbacks to pass to ``fit`` (none when ``enabled`` is false or there is nothing to
    tune: not TensorFlow, or not glibc). On the way out, whatever stopped ``fit``, TensorFlow's
    setting is put back.

    Keras feeds a PyDataset to TensorFlow through ``tf.data.Dataset.from_generator``, whose op calls
    ``mallopt(M_MMAP_THRESHOLD, 128 KiB)`` (a mitigation for a Python 3.11 leak). From then on every
    tensor of 128 KiB or more in the training step (gradients, activations, the batch) is a fresh
    ``mmap``, page-faulted in and unmapped again: on bench/train_bench.py that was 8.7 million page
    faults and more than twice the CPU time per epoch (13.5 s instead of 6). The in-memory path never
    creates that op. An 8 MiB mmap threshold and 16 MiB trim threshold let glibc's arenas reuse that
    memory (0.46 million faults); larger values cost more peak memory for no more speed, and smaller
    trim thresholds bring the faults back.
    """
    fn = _mallopt() if enabled else None
    if fn is None:
        yield []
        return
    _set_malloc(fn, MALLOC_THRESHOLDS)
    try:
        yield [_KeepStreamingMalloc(fn)]
    finally:
        _set_malloc(fn, TF_MALLOC)


class H5Batches(keras.utils.PyDataset):
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

    ``path`` may be a :class:`featpipe.training.inputs.CacheIndex`: batches are then read from the file it
    holds open (the cache as the index saw it, whatever replaces it meanwhile), and its masks.

    The order is a function of ``seed`` and the epoch alone, so batches are the same whichever
    worker thread reads them. Keras must not reorder the batches: fit with ``shuffle=False``
    (reordering stays correct, only slower, since windows are then re-read).
    """

    MAX_GAP = 2  # rows between two wanted rows that are read and dropped rather than split into two reads

    def __init__(
        self,
        path: str | Path,
        rows: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        sample_weight: np.ndarray | None = None,
        block_rows: int = 16,
        window_batches: int = 8,
        max_windows: int = 2,
        dtype: str | None = "float32",
        **kwargs,
    ):
        super().__init__(**kwargs)
        index = path if hasattr(path, "opened") else None  # a featpipe.training.inputs.CacheIndex
        self.path = Path(index.path if index is not None else path)
        self._shared = index.file if index is not None else None  # the index's open file: never closed here
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
        if index is not None:
            self._masks = index.mask[self.rows]
        else:
            with open_h5(self.path) as f:
                self._masks = f["mask"][()].astype(bool)[self.rows] if len(self.rows) else np.zeros((0, 0), bool)
        self._epoch = 0
        self._order = self._plan()

    def _init_state(self) -> None:
        self._file = None
        self._lock = threading.Lock()
        self._window_locks: dict = {}
        self._windows: OrderedDict = OrderedDict()  # (epoch, window) -> (features, where)

    def __getstate__(self):  # for use_multiprocessing: locks, the open file and the windows stay behind
        state = self.__dict__.copy()
        for key in ("_file", "_lock", "_window_locks", "_windows", "_shared"):
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
            self._rng.shuffle(order[start : start + self.window_rows])
        return order

    def _h5(self):
        if getattr(self, "_shared", None) is not None:
            return self._shared
        if self._file is None:
            self._file = open_h5(self.path)
        return self._file

    def _read_window(self, w: int):
        """Window ``w``'s rows in file order (file dtype), and where each entry of the window lies in it."""
        rows = self.rows[self._order[w * self.window_rows : (w + 1) * self.window_rows]]
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
        pick = self._order[start : start + self.batch_size]
        w, k = divmod(start, self.window_rows)
        x, where = self._window(w)
        x = x[where[k : k + len(pick)]]
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
        """Close the file and drop the windows."""
        with self._lock:
            self._windows.clear()
            if self._file is not None:
                self._file.close()
                self._file = None
