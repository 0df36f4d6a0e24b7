"""The cache's journal: one checksummed record per finished clip; a torn or corrupt record is dropped."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from cache_helpers import CONFIG, clip
from featpipe.cache.journal import iter_journal
from featpipe.cache.schema import journal_path
from featpipe.cache.writer import CacheWriter

pytestmark = pytest.mark.usefixtures("default_threshold")  # featpipe's default one-file threshold


@pytest.mark.parametrize("cut_from_end", list(range(1, 60)))
def test_a_record_torn_anywhere_is_dropped_and_earlier_clips_survive(tmp_path, cut_from_end):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, CONFIG)
    for i in range(3):
        w.append(clip(i))
    w.close()
    j = journal_path(path)
    size = j.stat().st_size
    with open(j, "r+b") as fh:  # a SIGKILL in the middle of writing the third record
        fh.truncate(size - cut_from_end)
    w2 = CacheWriter(path, CONFIG)
    assert w2.done == {"train/a/clip0.mp4", "train/a/clip1.mp4"}
    w2.append(clip(2))  # the resumed run redoes the torn clip
    w2.finalize()
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["features"][2], clip(2).features)
        assert f["video"].shape == (3,)


def test_corrupted_bytes_inside_a_record_are_detected_by_the_checksum(tmp_path):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, CONFIG)
    for i in range(2):
        w.append(clip(i))
    w.close()
    j = journal_path(path)
    data = bytearray(j.read_bytes())
    data[-10] ^= 0xFF  # flip bits in the last record's payload
    j.write_bytes(bytes(data))
    assert [h["video"] for h in iter_journal(j)] == ["train/a/clip0.mp4"]
