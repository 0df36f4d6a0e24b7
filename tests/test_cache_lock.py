"""Locks beside a cache: one writer at a time, and readers keep the part files they read."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from cache_helpers import CONFIG, KEYS, clip, part_files, write_clips
from featpipe.cache.lock import CacheLock
from featpipe.cache.shards import compact_cache
from featpipe.cache.writer import CacheWriter
from featpipe.errors import CacheError

pytestmark = pytest.mark.usefixtures("default_threshold")  # featpipe's default one-file threshold


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    path = tmp_path / "c.h5"
    with CacheLock(path):
        with pytest.raises(CacheError, match="Another featpipe extraction is writing"):
            with CacheLock(path):
                pass
    with CacheLock(path):  # released on exit
        pass


def test_the_lock_is_released_when_its_process_is_killed(tmp_path):
    path = tmp_path / "c.h5"
    code = (
        "import sys, time; from pathlib import Path; from featpipe.cache.lock import CacheLock;"
        f"l = CacheLock(Path({str(path)!r})).__enter__(); print('locked', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(CacheError):
            with CacheLock(path):
                pass
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        with CacheLock(path):
            pass
    finally:
        proc.kill()
        proc.wait()


def test_a_reader_keeps_reading_the_cache_it_opened_while_it_is_compacted_or_grown(tmp_path, parted):
    """Part files a replaced cache named stay while a reader holds it; rows never shift under it."""
    from featpipe.training.inputs import load_rows, open_index

    path = tmp_path / "c.h5"
    write_clips(path, KEYS[:4])
    w = CacheWriter(path, CONFIG)
    for key in KEYS[4:6]:
        w.append(clip(KEYS.index(key), key))
    w.finalize()
    old_parts = part_files(path)
    assert len(old_parts) == 2
    index = open_index(path)  # as train, evaluate and tune open it
    rows = np.arange(len(index.videos))
    expected = np.stack([clip(KEYS.index(k)).features for k in index.videos]).astype(np.float32)
    compact_cache(path)  # in place: one file, the two parts superseded
    x, _ = load_rows(index, rows)
    np.testing.assert_array_equal(x["features"], expected)  # not NaN where a part was
    assert part_files(path) == old_parts, "kept while a reader holds the cache that names them"
    w = CacheWriter(path, CONFIG)  # a clip whose key sorts first: every row of a rewritten cache moves
    w.append(clip(0, "test/a/0first.mp4"))
    w.finalize()
    x, _ = load_rows(index, rows)
    np.testing.assert_array_equal(x["features"], expected)
    index.close()
    CacheWriter(path, CONFIG)  # the next writer with no reader left removes them
    assert not set(part_files(path)) & set(old_parts)


READER = """
import sys
import numpy as np
from featpipe.training.inputs import load_rows, open_index
index = open_index(sys.argv[1])
print("open", flush=True)
sys.stdin.readline()
x, _ = load_rows(index, np.arange(len(index.videos)))
print("finite" if np.isfinite(x["features"]).all() else "NaN", len(x["features"]), flush=True)
"""


def test_a_reader_in_another_process_keeps_the_parts_it_reads_until_it_is_done(tmp_path, parted):
    path = tmp_path / "c.h5"
    write_clips(path, KEYS[:4])
    old = part_files(path)
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert reader.stdout.readline().strip() == "open"
        compact_cache(path)  # `featpipe merge --compact` while `train` reads
        assert part_files(path) == old
        reader.stdin.write("go\n")
        reader.stdin.flush()
        assert reader.stdout.readline().split() == ["finite", "4"]
        assert reader.wait(timeout=120) == 0
    finally:
        if reader.poll() is None:
            reader.kill()
    CacheWriter(path, CONFIG)  # no reader left: the next writer removes them
    assert not part_files(path)
