"""The cache writer: the documented schema, resume, crash safety, clip identity, refusal of mismatches, full disks."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from cache_helpers import (
    CONFIG,
    IDENT,
    D,
    T,
    by_key,
    clip,
    downgrade_to_version_1,
    identified,
    killed,
    merge_cli,
    part_files,
    read_all,
    refused,
    stamped,
    write_shards,
)
from featpipe.cache.journal import iter_journal
from featpipe.cache.lock import CacheLock
from featpipe.cache.reader import read_config, summarize
from featpipe.cache.schema import SCHEMA_VERSION, CacheConfig, ClipRecord, journal_path
from featpipe.cache.writer import CacheWriter
from featpipe.errors import CacheError, CannotWrite
from mounts import fill, read_only, tmpfs

pytestmark = pytest.mark.usefixtures("default_threshold")  # featpipe's default one-file threshold


def test_finalized_cache_has_the_documented_schema_and_reads_with_plain_h5py_and_pandas(tmp_path):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, CONFIG)
    for i in (2, 0, 1):  # completion order differs from key order
        w.append(clip(i))
    w.append(ClipRecord("train/b/bad.mp4", 1, "train", 0, error="no decodable frame"))
    w.finalize()
    with h5py.File(path, "r") as f:
        assert f.attrs["schema_version"] == SCHEMA_VERSION
        for key in ("backbone", "weights", "weights_fingerprint", "input_size", "frames", "sampling", "class_names"):
            assert key in f.attrs
        assert f["features"].shape == (3, T, D) and f["features"].dtype == np.float16
        assert f["features"].chunks == (1, T, D)
        assert f["mask"].dtype == bool and f["mask"].shape == (3, T)
        df = pd.DataFrame(
            {
                "video": f["video"].asstr()[:],
                "label": f["label"][:],
                "split": f["split"].asstr()[:],
                "n_frames": f["n_frames"][:],
            }
        )
        assert list(df.video) == [f"train/a/clip{i}.mp4" for i in range(3)]  # sorted by key
        assert list(df.n_frames) == [30, 31, 32]
        np.testing.assert_array_equal(f["features"][1], clip(1).features)
        assert list(f["failed/video"].asstr()[:]) == ["train/b/bad.mp4"]
        assert list(f["failed/reason"].asstr()[:]) == ["no decodable frame"]
    assert not journal_path(path).exists()


def test_resume_adds_to_an_existing_cache_and_equals_a_clean_write(tmp_path):
    first = tmp_path / "resumed.h5"
    w = CacheWriter(first, CONFIG)
    w.append(clip(0))
    w.append(clip(3))
    w.finalize()
    w = CacheWriter(first, CONFIG)
    assert w.done == {"train/a/clip0.mp4", "train/a/clip3.mp4"}
    for i in (1, 2):
        w.append(clip(i))
    w.finalize()
    clean = tmp_path / "clean.h5"
    w = CacheWriter(clean, CONFIG)
    for i in range(4):
        w.append(clip(i))
    w.finalize()
    with h5py.File(first, "r") as a, h5py.File(clean, "r") as b:
        for name in ("features", "mask", "label", "split", "video", "n_frames", "failed/video"):
            np.testing.assert_array_equal(a[name][()], b[name][()])
        assert dict(a.attrs).keys() == dict(b.attrs).keys()


def test_a_finalize_killed_before_its_rename_leaves_the_old_cache_and_resumes(tmp_path):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, CONFIG)
    w.append(clip(0))
    w.finalize()
    w = CacheWriter(path, CONFIG)
    w.append(clip(1))
    w.close()
    stale = tmp_path / "c.h5.tmp-99999"
    stale.write_bytes(b"half an hdf5 file")  # what a kill during finalize leaves behind
    w = CacheWriter(path, CONFIG)
    assert not stale.exists()
    assert w.done == {"train/a/clip0.mp4", "train/a/clip1.mp4"}
    w.finalize()
    assert summarize(path).n_clips == 2


def test_a_kill_after_the_rename_but_before_the_journal_is_removed_does_not_duplicate(tmp_path):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, CONFIG)
    w.append(clip(0))
    w.close()
    saved = journal_path(path).read_bytes()
    w = CacheWriter(path, CONFIG)
    w.finalize()
    journal_path(path).write_bytes(saved)  # the journal came back: same clip in cache and journal
    w = CacheWriter(path, CONFIG)
    w.finalize()
    assert summarize(path).n_clips == 1


def test_a_clip_that_failed_before_and_now_succeeds_leaves_failed(tmp_path):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, CONFIG)
    w.append(ClipRecord("train/a/clip0.mp4", 0, "train", 0, error="truncated"))
    w.finalize()
    w = CacheWriter(path, CONFIG)
    assert w.failed == {"train/a/clip0.mp4": "truncated"}
    w.append(clip(0))
    w.finalize()
    s = summarize(path)
    assert s.n_clips == 1 and s.failed == []


def test_assignments_from_the_current_index_update_labels_and_splits(tmp_path):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, CONFIG)
    w.append(clip(0))
    w.finalize({"train/a/clip0.mp4": (1, "val")})
    with h5py.File(path, "r") as f:
        assert f["label"][0] == 1 and f["split"].asstr()[0] == "val"


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(frames=8), "frames: 8 requested, 4 in the cache"),
        (dict(backbone="resnet50"), "backbone: resnet50 requested, vgg16 in the cache"),
        (dict(weights_fingerprint="zzz"), "weights_fingerprint"),
        (dict(input_size=64), "input_size: 64 requested, 32"),
        (dict(sampling="first"), "sampling: first requested, uniform"),
        (dict(class_names=("a", "b", "c")), "class_names"),
    ],
)
def test_extracting_into_a_cache_with_other_settings_is_refused_saying_what_differs(tmp_path, change, words):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, CONFIG)
    w.append(clip(0))
    w.finalize()
    with pytest.raises(CacheError, match=words.replace("(", r"\(")):
        CacheWriter(path, replace(CONFIG, **change))
    # an unfinished journal with other settings is refused too
    other = tmp_path / "j.h5"
    w = CacheWriter(other, CONFIG)
    w.append(clip(0))
    w.close()
    with pytest.raises(CacheError, match="unfinished extraction"):
        CacheWriter(other, replace(CONFIG, **change))


def test_a_fingerprint_settled_later_is_checked_as_opening_checks_it_and_nothing_is_written_before(tmp_path):
    """--engine ray opens the writer while the driver's fingerprint is still being computed."""
    path, journaled = tmp_path / "c.h5", tmp_path / "j.h5"
    for target in (path, journaled):
        w = CacheWriter(target, CONFIG)
        w.append(clip(0))
        w.close()
    CacheWriter(path, CONFIG).finalize()  # path: a finished cache; journaled: an unfinished journal
    unknown = replace(CONFIG, weights_fingerprint=None)
    for target, what in ((path, "existing cache"), (journaled, "unfinished extraction")):
        with pytest.raises(CacheError) as opened:
            CacheWriter(target, replace(CONFIG, weights_fingerprint="zzz"))
        w = CacheWriter(target, unknown)  # every other setting is the same: opens
        with pytest.raises(RuntimeError, match="settle_fingerprint"):
            w.append(clip(1))
        with pytest.raises(CacheError, match=what) as settled:
            w.settle_fingerprint("zzz")
        assert str(settled.value) == str(opened.value), "the sentence opening says"
    with pytest.raises(CacheError, match="frames: 8 requested, 4 in the cache"):  # the rest is checked at once
        CacheWriter(path, replace(unknown, frames=8))
    w = CacheWriter(path, unknown)
    w.settle_fingerprint(CONFIG.weights_fingerprint)
    w.append(clip(1))
    w.finalize()
    assert read_all(path)["video"].tolist() == [b"train/a/clip0.mp4", b"train/a/clip1.mp4"]


def test_rows_record_their_clip_identity_and_rows_whose_clip_left_the_dataset_are_dropped_to_stale(tmp_path):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, CONFIG)
    for i in range(4):
        w.append(identified(i))
    w.append(replace(ClipRecord("train/b/bad.mp4", 1, "train", 0, error="zero-byte file"), size=0, mtime_ns=7))
    w.finalize()
    with h5py.File(path, "r") as f:
        assert f.attrs["schema_version"] == SCHEMA_VERSION == 4
        assert [tuple(x) for x in zip(f["size"][:], f["mtime_ns"][:])] == [IDENT[k] for k in sorted(IDENT)]
        assert (f["failed/size"][0], f["failed/mtime_ns"][0]) == (0, 7)
    w = CacheWriter(path, CONFIG)
    assert w.identity("train/a/clip2.mp4") == IDENT["train/a/clip2.mp4"]
    current = {k: v for k, v in IDENT.items() if k != "train/a/clip3.mp4"}  # clip3 deleted, clip1 changed
    current["train/a/clip1.mp4"] = (999, 1)
    w.finalize(current=current)
    assert (w.n_dropped, w.n_changed) == (1, 1)
    with h5py.File(path, "r") as f:
        assert list(f["video"].asstr()[:]) == ["train/a/clip0.mp4", "train/a/clip2.mp4"]
        assert dict(zip(f["stale/video"].asstr()[:], f["stale/reason"].asstr()[:])) == {
            "train/a/clip1.mp4": "its file changed after it was extracted",
            "train/a/clip3.mp4": "no longer in the dataset",
        }
        assert list(f["failed/video"].asstr()[:]) == [], "a failed clip that left the dataset is forgotten"
    assert summarize(path).n_clips == 2 and [k for k, _ in summarize(path).stale] == [
        "train/a/clip1.mp4",
        "train/a/clip3.mp4",
    ]


def test_a_version_1_cache_is_read_and_resumed_trusting_its_rows_and_recording_their_identity_from_then_on(tmp_path):
    from featpipe.training.inputs import open_index

    path = tmp_path / "c.h5"
    w = CacheWriter(path, CONFIG)
    for i in range(3):
        w.append(clip(i))
    w.finalize()
    downgrade_to_version_1(path)
    assert read_config(path) == CONFIG and summarize(path).n_clips == 3 and open_index(path) is not None
    w = CacheWriter(path, CONFIG)
    assert w.done == set(list(IDENT)[:3]) and w.identity("train/a/clip0.mp4") is None
    w.append(identified(3))
    w.finalize(current=IDENT)
    with h5py.File(path, "r") as f:
        assert f.attrs["schema_version"] == SCHEMA_VERSION
        assert [tuple(x) for x in zip(f["size"][:], f["mtime_ns"][:])] == [IDENT[k] for k in sorted(IDENT)]


def test_a_full_disk_while_journaling_or_writing_the_cache_is_one_sentence_and_keeps_cache_and_journal(tmp_path):
    with tmpfs(tmp_path / "disk", "1m") as disk:
        path = disk / "c.h5"
        w = CacheWriter(path, CONFIG)
        w.append(clip(0))
        w.finalize()
        old = path.read_bytes()
        big = replace(CONFIG, feature_shape=(4096,))  # 32 KiB a record: the disk fills in a few
        path.unlink()
        filler = fill(disk, leave=100_000)
        w = CacheWriter(path, big)
        with pytest.raises(
            CacheError,
            match=r"The disk holding .* is full; free some space and run the same command "
            r"again \(the clips finished so far are kept\)",
        ) as info:
            for i in range(100):
                w.append(ClipRecord(f"k{i:03d}.mp4", 0, "train", 4, np.ones((T, 4096), np.float16), np.ones(T, bool)))
        assert info.value.exit_code == 1
        w.close()
        kept = len(list(iter_journal(journal_path(path))))
        assert kept >= 1
        with pytest.raises(CacheError, match="is full") as info:  # no room for the HDF5 file either
            w.finalize()
        assert info.value.exit_code == 1
        assert not list(disk.glob("*.tmp-*")) and len(list(iter_journal(journal_path(path)))) == kept
        filler.unlink()
        CacheWriter(path, big).finalize()  # space freed: the same command finishes
        assert summarize(path).n_clips == kept and not journal_path(path).exists()
        path.unlink()
        path.write_bytes(old)  # and a full disk never touches an existing cache
        w = CacheWriter(path, CONFIG)
        w.append(clip(1))
        w.close()
        filler = fill(disk, leave=0)
        with pytest.raises(CacheError, match="is full"):
            w.finalize()
        assert path.read_bytes() == old and len(list(iter_journal(journal_path(path)))) == 1
        assert not list(disk.glob("*.tmp-*"))
        filler.unlink()


_FULL_WHILE_WRITING = """
import os, sys
from pathlib import Path
import numpy as np
from featpipe.cache.schema import CacheConfig, ClipRecord
from featpipe.cache.writer import CacheWriter
from featpipe.errors import CacheError
disk, leave = Path(sys.argv[1]), int(sys.argv[2])
config = CacheConfig("vgg16", "none", "fp", 32, 4, "uniform", "float32", (512,), ("a", "b"))
w = CacheWriter(disk / "c.h5", config)
for i in range(6):
    w.append(ClipRecord(f"v{i}.mp4", i % 2, "train", 4, np.ones((4, 512), np.float32), np.ones(4, bool)))
w.close()
st = os.statvfs(disk)
with open(disk / "filler", "wb") as fh:  # leave `leave` bytes: the journal is written, the HDF5 file is not
    fh.write(bytes(max(st.f_bavail * st.f_frsize - leave, 0)))
try:
    w.finalize()
except CacheError as exc:
    print(exc, exc.exit_code)
del w
"""


@pytest.mark.parametrize("layout", ["one file", "part files"])
def test_a_full_disk_inside_the_hdf5_write_is_the_sentence_and_no_crash_on_the_way_out(tmp_path, layout):
    """A full disk met by HDF5 itself while writing the final cache left handles it could not close: the
    sentence was printed, then the process died of a segmentation fault (status 139) freeing them. Caches
    over the one-file limit write a part file and an index file: the same holds for both."""
    env = {**os.environ, "FEATPIPE_ONE_FILE_MB": "64" if layout == "one file" else "0"}
    for leave in (8192, 24576, 40960):  # the disk fills in the HDF5 file's data, its metadata, at its close
        with tmpfs(tmp_path / "disk", "1m") as disk:
            done = subprocess.run(
                [sys.executable, "-c", _FULL_WHILE_WRITING, str(disk), str(leave)],
                text=True,
                capture_output=True,
                env=env,
            )
            assert done.returncode == 0, f"left {leave} bytes: status {done.returncode}\n{done.stderr[-2000:]}"
            assert "is full; free some space and run the same command again" in done.stdout and " 1\n" in done.stdout
            assert "Exception ignored" not in done.stderr
            assert (disk / "c.h5.journal").is_file() and not (disk / "c.h5").exists()  # nothing finished lost
            assert not list(disk.glob("*.tmp-*"))
            assert not [p for p in disk.rglob("*.h5") if p.parent.name.endswith(".parts")]  # no stray part
            (disk / "filler").unlink()  # space freed: the same command finishes from the journal
            CacheWriter(
                disk / "c.h5", CacheConfig("vgg16", "none", "fp", 32, 4, "uniform", "float32", (512,), ("a", "b"))
            ).finalize()
            assert summarize(disk / "c.h5").n_clips == 6


def test_a_read_only_folder_is_one_sentence_for_a_new_cache_and_for_merge(tmp_path):
    with tmpfs(tmp_path / "media", "4m") as media:
        out = media / "c.h5"
        shards = write_shards(out, 2)
        with read_only(media):
            with pytest.raises(CannotWrite, match=f"Cannot write to '{media}'"):
                with CacheLock(media / "new.h5"):
                    pass
            refused(merge_cli("--output", out), f"Cannot write to '{media}'", "--output")
            elsewhere = tmp_path / "merged.h5"  # shards on read-only media merge into a writable folder
            assert merge_cli("--output", elsewhere, *shards).exit_code == 0
        assert not out.exists() and not list(media.glob("*.tmp-*")) and shards[0].exists()


FINALIZE_KILLS = [
    ("featpipe.cache.parts.write_part", "after", 1),
    ("featpipe.cache.parts._link_part", "after", 1),
    ("featpipe.cache.parts.write_parted_temporary", "after", 1),
    ("featpipe.runtime.atomic.replace", "after", 1),
    ("featpipe.cache.parts.collect_parts", "before", 2),
]


@pytest.mark.parametrize("hook", FINALIZE_KILLS, ids=["-".join(map(str, h)) for h in FINALIZE_KILLS])
def test_a_finalize_killed_anywhere_resumes_to_the_cache_a_clean_run_writes(tmp_path, parted, hook):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, CONFIG)
    for i in range(3):
        w.append(clip(i))
    w.finalize()
    w = CacheWriter(path, CONFIG)
    for i in (3, 4):
        w.append(clip(i))
    w.append(clip(9, "train/a/clip1.mp4"))  # re-extracted: replaces an old row
    w.append(ClipRecord("train/b/bad.mp4", 1, "train", 0, error="no decodable frame"))
    w.close()
    assert killed(tmp_path, hook, "finalize", path)
    seen = set(by_key(path)["rows"])  # a reader sees the old cache or the new one, never a mix or a torn file
    assert seen in ({f"train/a/clip{i}.mp4" for i in range(3)}, {f"train/a/clip{i}.mp4" for i in range(5)})
    CacheWriter(path, CONFIG).finalize()  # the same command again
    clean = tmp_path / "clean.h5"
    w = CacheWriter(clean, CONFIG)
    for i in (0, 2, 3, 4):
        w.append(clip(i))
    w.append(clip(9, "train/a/clip1.mp4"))
    w.append(ClipRecord("train/b/bad.mp4", 1, "train", 0, error="no decodable frame"))
    w.finalize()
    assert by_key(path) == by_key(clean)
    assert not journal_path(path).exists() and not list(tmp_path.glob("c.h5.tmp-*"))
    with h5py.File(path, "r") as f:  # no orphan part file is left behind
        assert {Path(n).name for n in f["parts/file"].asstr()[:]} == {p.name for p in part_files(path)}


def test_standing_is_what_the_cache_and_journal_recorded_with_the_identity_each_clip_has_now(tmp_path):
    """The rows and failures a run reuses: recorded with the size and mtime the file has now (or with none,
    as a version 1 cache), the journal's record winning over the cache's; nothing outside ``current``."""
    path = tmp_path / "c.h5"
    w = CacheWriter(path, CONFIG)
    w.append(stamped(clip(0, "same.mp4"), 100))
    w.append(stamped(clip(1, "changed.mp4"), 101))
    w.append(clip(2, "unidentified.mp4"))  # no identity recorded (version 1): trusted
    w.append(stamped(clip(3, "gone.mp4"), 103))
    w.append(stamped(ClipRecord("broken.mp4", 0, "train", 0, error="no frame"), 104))
    w.append(stamped(ClipRecord("fixed.mp4", 0, "train", 0, error="no frame"), 105))
    w.append(stamped(clip(4, "failed later.mp4"), 106))
    w.finalize()
    w = CacheWriter(path, CONFIG)
    w.append(stamped(ClipRecord("failed later.mp4", 0, "train", 0, error="no frame"), 106))  # journal wins
    w.close()
    stamp = 1_700_000_000_000_000_000
    now = {
        "same.mp4": (100, stamp),
        "changed.mp4": (999, stamp),
        "unidentified.mp4": (102, stamp),
        "broken.mp4": (104, stamp),
        "fixed.mp4": (105, stamp + 1),
        "failed later.mp4": (106, stamp),
        "new.mp4": (107, stamp),
    }
    for writer in (w, CacheWriter(path, CONFIG)):  # the writer that journalled, and one resuming the journal
        rows, failures = writer.standing(now)
        assert rows == {"same.mp4", "unidentified.mp4"}
        assert failures == {"broken.mp4", "failed later.mp4"}


@pytest.mark.parametrize("assigned", ["every row", "some rows"])
@pytest.mark.parametrize("slab_bytes", [1, 1 << 24], ids=["row-by-row slabs", "one slab"])
def test_adding_clips_keeps_every_old_row_with_its_assignment_and_identity_in_parts_and_in_one_file(
    tmp_path, monkeypatch, assigned, slab_bytes
):
    """Adding clips writes the old rows' small columns anew from what the writer knows and (one file) copies
    their features in slabs: each row keeps its features, takes its (label, split) from the assignments where
    it has one and its identity from the current index; new keys sort between old ones, a dropped row splits
    the old rows' runs, and a parted cache equals the one-file cache."""
    import featpipe.cache.parts as fc

    monkeypatch.setattr(fc, "_SLAB_BYTES", slab_bytes)
    keys = [f"train/a/clip{i}.mp4" for i in range(10)]
    old, new, dropped = keys[0::2], keys[1::2], keys[4]
    stamp = 1_700_000_000_000_000_000
    assignments = {k: (i % 2, ("train", "val", "test")[i % 3]) for i, k in enumerate(keys)}
    if assigned == "some rows":
        assignments = {k: v for i, (k, v) in enumerate(assignments.items()) if i % 2}
    current = {k: (200 + i, stamp) for i, k in enumerate(keys) if k != dropped}
    for path, one_file in ((tmp_path / "parted.h5", False), (tmp_path / "one.h5", True)):
        monkeypatch.setenv("FEATPIPE_ONE_FILE_MB", "1000" if one_file else "0")
        w = CacheWriter(path, CONFIG)
        for k in old:
            w.append(stamped(clip(keys.index(k), k), 200 + keys.index(k)))
        w.finalize()
        w = CacheWriter(path, CONFIG)
        w.identities = current
        for k in new:
            w.append(clip(keys.index(k), k))  # stamped with its current identity by the writer
        w.finalize(assignments, current=current)
    parted_rows, one_rows = by_key(tmp_path / "parted.h5"), by_key(tmp_path / "one.h5")
    assert parted_rows == one_rows
    rows = parted_rows["rows"]
    assert sorted(rows) == sorted(current) and parted_rows["stale"] == {dropped: "no longer in the dataset"}
    for k in current:
        i = keys.index(k)
        features, mask, label, split, n_frames, size, mtime = rows[k]
        assert (features, mask, n_frames) == (clip(i, k).features.tobytes(), clip(i, k).mask.tobytes(), 30 + i)
        assert (label, split) == assignments.get(k, (i % 2, "train"))
        assert (size, mtime) == current[k]
    with h5py.File(tmp_path / "one.h5", "r") as f:
        assert list(f["video"].asstr()[:]) == sorted(current), "a one-file cache keeps its rows by key"
    assert len(part_files(tmp_path / "parted.h5")) == 2
