"""Stage one end to end: extraction, resume after kills, bad inputs, refusal of a second writer."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from cli_args import cli, extract_args, python_m
from featpipe.backbones.frame_source import FeatureExtractor
from featpipe.backbones.registry import REGISTRY, Backbone, register_backbone
from featpipe.backbones.weights import build_model, fingerprint
from featpipe.cache.journal import iter_journal
from featpipe.cache.lock import CacheLock
from featpipe.cache.reader import summarize
from featpipe.cache.schema import journal_path
from featpipe.cache.shards import merge_shards, shard_of, shard_path
from featpipe.cache.writer import CacheWriter
from featpipe.cli import app
from featpipe.errors import CacheError, ExtractionFailed, FeatpipeError
from featpipe.extraction.extract import extract
from featpipe.video.datasets import index_dataset
from featpipe.video.decode import count_frames, read_clip
from featpipe.video.sample_data import write_sample_data
from videos import (
    write_1x1,
    write_gray,
    write_no_frames,
    write_odd_size,
    write_text_as_video,
    write_truncated,
    write_video,
    write_wide,
    write_zero_byte,
)

SMALL = dict(backbone="vgg16", size=32, frames=8, weights="none", quiet=True, batch_size=8)
DATASETS = ("features", "mask", "label", "split", "video", "n_frames", "failed/video", "failed/reason")


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample") / "data"
    write_sample_data(root, train=2, val=1, test=1, seed=0)
    return root


def read_all(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        out = {name: f[name][()] for name in DATASETS}
        out["attrs"] = dict(f.attrs)
    return out


def assert_same_cache(a: Path, b: Path) -> None:
    x, y = read_all(a), read_all(b)
    for name in DATASETS:
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)
    assert x["attrs"].keys() == y["attrs"].keys()
    for key in ("backbone", "weights_fingerprint", "input_size", "frames", "sampling", "dtype"):
        assert x["attrs"][key] == y["attrs"][key]


def test_every_clip_is_extracted_with_a_mask_true_exactly_for_real_frames(sample, tmp_path):
    out = tmp_path / "c.h5"
    result = extract(data=sample, output=out, **{**SMALL, "frames": 16})
    ds = index_dataset(sample)
    assert result.n_clips == len(ds.records) == 16 and result.n_new == 16 and result.failed == []
    with h5py.File(out, "r") as f:
        videos = list(f["video"].asstr()[:])
        assert videos == [r.video for r in ds.records]
        feats, mask, n_frames = f["features"][:], f["mask"][:], f["n_frames"][:]
        labels, splits = f["label"][:], list(f["split"].asstr()[:])
    for i, rec in enumerate(ds.records):
        true_count = count_frames(rec.path)
        assert n_frames[i] == true_count
        assert mask[i].sum() == min(true_count, 16)
        assert mask[i, : mask[i].sum()].all(), "real frames come first"
        assert not feats[i][~mask[i]].any(), "padded steps hold zeros"
        assert np.abs(feats[i][mask[i]]).sum(axis=-1).min() > 0
        assert labels[i] == ds.label_index(rec.label) and splits[i] == rec.split
    assert (mask.sum(axis=1) < 16).any() and (n_frames > 16).any(), "both padded and subsampled clips were checked"


def test_features_are_the_backbone_applied_to_each_clips_sampled_frames(sample, tmp_path):
    """Batching frames ACROSS clips must never mix up which clip a feature belongs to."""
    out = tmp_path / "c.h5"
    extract(data=sample, output=out, **{**SMALL, "batch_size": 5})  # batches straddle clip boundaries
    ex = FeatureExtractor("vgg16", 32, "none", batch_size=8)
    ds = index_dataset(sample)
    with h5py.File(out, "r") as f:
        for i in (0, 7, 15):
            clip = read_clip(ds.records[i].path, 8, 32, "uniform")
            direct = ex(clip.frames[clip.mask]).astype(np.float16)
            np.testing.assert_allclose(
                f["features"][i][clip.mask].astype(np.float32), direct.astype(np.float32), rtol=2e-3, atol=1e-3
            )


def test_rerun_skips_every_clip_already_in_the_cache_and_extracts_only_new_ones(sample, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(sample, data)
    out = tmp_path / "c.h5"
    extract(data=data, output=out, **SMALL)
    again = extract(data=data, output=out, **SMALL)
    assert (again.n_new, again.n_skipped, again.n_clips) == (0, 16, 16)
    write_video(data / "train" / "grow" / "extra clip.mp4", 12, 64, 48)
    third = extract(data=data, output=out, **SMALL)
    assert (third.n_new, third.n_skipped, third.n_clips) == (1, 16, 17)
    assert gc.get_freeze_count() == 0, "extract leaves the garbage collector as it found it"


def test_extract_keeps_the_objects_alive_before_its_heavy_imports_out_of_the_collectors_walks():
    """What exists when extract starts (the index: objects per clip) is frozen for the run, so the full
    collections of the Keras import do not walk it again, and is given back after, even on an error;
    a freeze made by someone else (e.g. a server before forking) is left alone."""
    from featpipe.extraction.extract import _collector_skips_what_exists

    assert gc.get_freeze_count() == 0
    kept = [object() for _ in range(10)]
    with _collector_skips_what_exists():
        assert gc.get_freeze_count() >= len(kept)
    assert gc.get_freeze_count() == 0
    with pytest.raises(KeyboardInterrupt), _collector_skips_what_exists():
        raise KeyboardInterrupt
    assert gc.get_freeze_count() == 0
    gc.freeze()  # (the count falls as frozen objects are freed, so only "still frozen" is checked)
    try:
        with _collector_skips_what_exists():
            assert gc.get_freeze_count() > 0
        assert gc.get_freeze_count() > 0, "a freeze made by someone else is not undone"
    finally:
        gc.unfreeze()


def _extract_cmd(data: Path, out: Path) -> list[str]:
    tiny = dict(backbone="inceptionv3", size=75, frames=8, weights="none", batch_size=4, workers=1, quiet=True)
    return python_m(*extract_args(data, out, **tiny))


def _records(out: Path) -> int:
    j = journal_path(out)
    return sum(1 for _ in iter_journal(j)) if j.exists() else 0


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_ends_with_the_clean_runs_cache(sample, tmp_path):
    """Kill a real extraction before any clip, after the first, and mid-way; each restart resumes."""
    clean = tmp_path / "clean.h5"
    subprocess.run(_extract_cmd(sample, clean), check=True, capture_output=True)
    out = tmp_path / "killed.h5"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for kill_after_records in (0, 1, 6, 12):
        before = _records(out)
        proc = subprocess.Popen(
            _extract_cmd(sample, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 120
        if kill_after_records == 0:
            time.sleep(1.0)  # still importing / building the network
        else:
            while _records(out) < kill_after_records and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if kill_after_records:
            assert _records(out) >= min(kill_after_records, before + 1), "progress was kept across the kill"
    final = subprocess.run(_extract_cmd(sample, out), capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert "already in the cache" in final.stdout
    skipped = int(final.stdout.split(" already in the cache")[0].rsplit(";", 1)[-1].strip())
    assert skipped >= 12, "clips journalled before the kills were not extracted again"
    assert not journal_path(out).exists()
    assert_same_cache(out, clean)


def test_a_second_extraction_into_the_same_cache_is_refused(sample, tmp_path):
    out = tmp_path / "c.h5"
    with CacheLock(out):
        proc = subprocess.run(_extract_cmd(sample, out), capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Another featpipe extraction is writing" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture
def messy(tmp_path) -> Path:
    """Good clips plus every kind of bad or odd file, in class folders with awkward names."""
    root = tmp_path / "messy"
    a, b = root / "train" / "alpha", root / "train" / "beta β"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    write_video(a / "good one.mp4", 30, 64, 48)
    write_video(b / "gööd.mp4", 10, 48, 64)
    write_zero_byte(a / "empty.mp4")
    write_text_as_video(a / "notes.mp4")
    write_truncated(b / "cut.mp4", a / "good one.mp4")
    write_no_frames(b / "noframes.mp4")
    write_1x1(a / "tiny.avi")
    write_wide(b / "wide.mp4")
    write_gray(a / "gray.mp4")
    write_odd_size(b / "odd.mp4")
    return root


def test_bad_files_are_listed_with_reasons_and_do_not_stop_the_run(messy, tmp_path):
    out = tmp_path / "c.h5"
    result = extract(data=messy, output=out, **SMALL)
    failed = dict(result.failed)
    assert set(failed) == {
        "train/alpha/empty.mp4",
        "train/alpha/notes.mp4",
        "train/beta β/cut.mp4",
        "train/beta β/noframes.mp4",
    }
    assert all(reason for reason in failed.values())
    assert "zero" in failed["train/alpha/empty.mp4"].lower() or "empty" in failed["train/alpha/empty.mp4"].lower()
    with h5py.File(out, "r") as f:
        assert sorted(f["video"].asstr()[:]) == sorted(
            [
                "train/alpha/good one.mp4",
                "train/alpha/gray.mp4",
                "train/alpha/tiny.avi",
                "train/beta β/gööd.mp4",
                "train/beta β/odd.mp4",
                "train/beta β/wide.mp4",
            ]
        )
        assert np.isfinite(f["features"][:].astype(np.float32)).all()


def test_a_truncated_clip_is_kept_from_its_whole_frames_and_reported_as_damaged(tmp_path):
    root = tmp_path / "data"
    a, b = root / "train" / "alpha", root / "train" / "beta"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    write_video(a / "whole.avi", 30, 64, 48)
    write_truncated(b / "cut.avi", write_video(tmp_path / "full.avi", 60, 64, 64), 0.7)
    result = extract(data=root, output=tmp_path / "c.h5", **SMALL)
    assert result.failed == []
    [warning] = [line for line in result.summary_lines if "damaged" in line]
    assert "train/beta/cut.avi (from frame " in warning and "whole.avi" not in warning
    frame = int(warning.split("(from frame ")[1].split(")")[0])
    with h5py.File(tmp_path / "c.h5", "r") as f:
        n_frames = dict(zip(f["video"].asstr()[:], f["n_frames"][:]))
    assert n_frames == {"train/alpha/whole.avi": 30, "train/beta/cut.avi": frame}
    assert 0 < frame < 60


def test_strict_fails_the_run_but_keeps_the_good_clips(messy, tmp_path):
    out = tmp_path / "c.h5"
    with pytest.raises(ExtractionFailed, match="--strict"):
        extract(data=messy, output=out, strict=True, **SMALL)
    with h5py.File(out, "r") as f:
        assert f["video"].shape == (6,)


def test_no_usable_clip_at_all_is_an_error(tmp_path):
    root = tmp_path / "bad"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        write_zero_byte(root / cls / "x.mp4")
        write_text_as_video(root / cls / "y.mp4")
    with pytest.raises(ExtractionFailed, match="No clip could be used"):
        extract(data=root, output=tmp_path / "c.h5", **SMALL)


def test_other_settings_into_an_existing_cache_are_refused_saying_what_differs(sample, tmp_path):
    from featpipe.errors import CacheError

    out = tmp_path / "c.h5"
    extract(data=sample, output=out, **SMALL)
    with pytest.raises(CacheError, match="frames: 6 requested, 8 in the cache"):
        extract(data=sample, output=out, **{**SMALL, "frames": 6})
    with pytest.raises(CacheError, match="weights_fingerprint"):
        extract(data=sample, output=out, **{**SMALL, "seed": 1})
    with pytest.raises(CacheError, match="precision: mixed_bfloat16 requested, float32 in the cache"):
        extract(data=sample, output=out, **{**SMALL, "precision": "mixed_bfloat16"})


def test_first_sampling_stores_the_first_frames_and_float32_is_honoured(sample, tmp_path):
    uni, first = tmp_path / "u.h5", tmp_path / "f.h5"
    extract(data=sample, output=uni, **SMALL)
    extract(data=sample, output=first, sampling="first", dtype="float32", **{k: v for k, v in SMALL.items()})
    with h5py.File(uni, "r") as u, h5py.File(first, "r") as f:
        assert f["features"].dtype == np.float32 and f.attrs["sampling"] == "first"
        long = int(np.argmax(u["n_frames"][:]))
        assert u["n_frames"][long] > 8
        assert not np.allclose(u["features"][long, -1].astype(np.float32), f["features"][long, -1])
        np.testing.assert_allclose(
            u["features"][long, 0].astype(np.float32), f["features"][long, 0], rtol=2e-3, atol=1e-2
        )


def test_default_cache_path_is_cache_dir_slash_backbone(sample, tmp_path):
    result = extract(data=sample, cache_dir=tmp_path / "cache", **SMALL)
    assert result.cache == tmp_path / "cache" / "vgg16.h5" and result.cache.exists()


def test_raw_backbone_caches_the_sampled_frames_as_uint8(sample, tmp_path):
    out = tmp_path / "raw.h5"
    extract(data=sample, output=out, backbone="raw", size=16, frames=8, quiet=True)
    ds = index_dataset(sample)
    with h5py.File(out, "r") as f:
        assert f["features"].dtype == np.uint8 and f["features"].shape == (16, 8, 16, 16, 3)
        assert f.attrs["backbone"] == "raw" and f.attrs["weights"] == "none"
        clip = read_clip(ds.records[3].path, 8, 16, "uniform")
        np.testing.assert_array_equal(f["features"][3], clip.frames)


# ----------------------------------------------------------------------------- a backbone of one's own


def _tiny_build(weights, input_shape):
    """A three-layer network: what a keras_hub or home-made backbone's entry would build."""
    import keras

    if weights is not None:
        raise ValueError("the tiny test network has no pretrained weights")
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Conv2D(12, 3, padding="same", activation="relu")(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x), name="tiny")


def _tiny_preprocess(x):
    """Its own preprocessing, NumPy array or Keras tensor: [0, 255] -> [0, 2] (none of the registry's)."""
    return x / 127.5


@pytest.fixture
def tiny_backbone():
    entry = register_backbone(
        Backbone(
            "tinytest",
            build=_tiny_build,
            preprocess_input=_tiny_preprocess,
            default_size=24,
            feature_dim=12,
            min_size=16,
        )
    )
    yield entry
    REGISTRY.pop("tinytest", None)


def test_a_registered_backbone_is_one_entry_and_extracts_end_to_end(tiny_backbone, tmp_path):
    data = tiny_dataset(tmp_path / "data", per_class=2)
    out = tmp_path / "tiny.h5"
    result = extract(data=data, output=out, backbone="tinytest", frames=4, weights="none", quiet=True, batch_size=3)
    assert result.n_clips == 4 and result.failed == []
    assert result.cache == out
    model = build_model(tiny_backbone, 24, "none", seed=0)  # the deterministic `none` network of that entry
    ds = index_dataset(data)
    with h5py.File(out, "r") as f:
        assert f["features"].shape == (4, 4, 12)
        assert f.attrs["backbone"] == "tinytest" and f.attrs["input_size"] == 24
        assert f.attrs["weights_fingerprint"] == fingerprint(model)
        for i, rec in enumerate(ds.records):
            clip = read_clip(rec.path, 4, 24, "uniform")
            direct = np.asarray(model.predict_on_batch(tiny_backbone.preprocess(clip.frames[clip.mask])))
            got = f["features"][i][clip.mask].astype(np.float32)
            np.testing.assert_allclose(got, direct, rtol=2e-3, atol=2e-3 * np.abs(direct).max())
    default = extract(
        data=data, cache_dir=tmp_path / "cache", backbone="tinytest", frames=4, weights="none", quiet=True
    )
    assert default.cache == tmp_path / "cache" / "tinytest.h5"


# ----------------------------------------------------------------------------- shards

# One frame per forward pass: on CPU a frame's features can differ in the last float16 bit with the
# frames that share its batch, and a shard batches other frames together than a whole run does.
EXACT = {**SMALL, "batch_size": 1}


@pytest.fixture(scope="module")
def unsharded(sample, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unsharded") / "whole.h5"
    extract(data=sample, output=out, **EXACT)
    return out


def test_shards_partition_the_clips_and_merged_equal_an_unsharded_extraction(sample, unsharded, tmp_path):
    out = tmp_path / "c.h5"
    results = [extract(data=sample, output=out, shard=f"{i}/3", **EXACT) for i in (1, 2, 3)]
    assert [r.cache for r in results] == [tmp_path / f"c.shard-{i}-of-3.h5" for i in (1, 2, 3)]
    assert not out.exists()
    whole = read_all(unsharded)
    row_of = {v.decode(): i for i, v in enumerate(whole["video"])}
    seen, classes_present = [], []
    for i, result in enumerate(results, 1):
        shard = read_all(result.cache)
        videos = [v.decode() for v in shard["video"]]
        assert videos and all(shard_of(v, 3) == i for v in videos)
        assert shard["attrs"]["shard"] == f"{i}/3"
        assert list(shard["attrs"]["class_names"]) == list(whole["attrs"]["class_names"])
        rows = [row_of[v] for v in videos]
        np.testing.assert_array_equal(shard["label"], whole["label"][rows])
        np.testing.assert_array_equal(shard["split"], whole["split"][rows])
        seen += videos
        classes_present.append(len(set(shard["label"])))
    assert sorted(seen) == sorted(row_of), "every clip in exactly one shard"
    assert min(classes_present) < 4, "a shard lacking a class still records all four class names"
    merge_shards(output=out)
    assert_same_cache(out, unsharded)
    assert "shard" not in read_all(out)["attrs"]


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs, so the clips stay in the journal."""


def test_a_killed_shard_resumes_from_its_own_journal_and_lock(sample, unsharded, tmp_path, monkeypatch):
    out = tmp_path / "c.h5"
    first = shard_path(out, 1, 2)
    appended = []
    real_append = CacheWriter.append

    def append_then_die(self, rec):
        if len(appended) == 3:
            raise Killed()
        appended.append(rec.video)
        real_append(self, rec)

    monkeypatch.setattr(CacheWriter, "append", append_then_die)
    with pytest.raises(Killed):
        extract(data=sample, output=out, shard="1/2", **EXACT)
    monkeypatch.undo()
    assert [h["video"] for h in iter_journal(journal_path(first))] == appended
    assert not first.exists() and not journal_path(out).exists()
    with CacheLock(first):  # shard 1 "still running": shard 2 has a lock and journal of its own
        extract(data=sample, output=out, shard="2/2", **EXACT)
        with pytest.raises(CacheError, match="being written by a running extraction"):
            merge_shards(output=out)
    with pytest.raises(CacheError, match=r"unfinished extraction.*--shard 1/2"):
        merge_shards(output=out)
    resumed = extract(data=sample, output=out, shard="1/2", **EXACT)
    assert (resumed.n_skipped, resumed.n_new) == (3, resumed.n_clips - 3)
    assert not journal_path(first).exists()
    merge_shards(output=out)
    assert_same_cache(out, unsharded)


def test_a_shard_that_gets_no_clip_writes_a_valid_empty_cache(tmp_path):
    data = tmp_path / "tiny"
    write_video(data / "a" / "one.mp4", 10, 48, 48)
    write_video(data / "b" / "two.mp4", 10, 48, 48)
    keys = [r.video for r in index_dataset(data).records]
    idle = next(i for i in (1, 2, 3) if all(shard_of(k, 3) != i for k in keys))
    result = extract(data=data, output=tmp_path / "c.h5", shard=f"{idle}/3", **SMALL)
    assert result.n_clips == 0 and result.failed == []
    summary = summarize(result.cache)
    assert summary.n_clips == 0 and summary.config.class_names == ("a", "b")
    with h5py.File(result.cache, "r") as f:
        assert f["features"].shape == (0, 8, 512) and f.attrs["shard"] == f"{idle}/3"


def test_a_backbone_failure_mid_run_keeps_every_clip_finished_before_it(sample, tmp_path, monkeypatch):
    out = tmp_path / "c.h5"
    calls = []
    real_call = FeatureExtractor.__call__

    def fail_on_the_fourth_batch(self, frames):
        calls.append(len(frames))
        if len(calls) == 4:
            raise RuntimeError("device lost")
        return real_call(self, frames)

    monkeypatch.setattr(FeatureExtractor, "__call__", fail_on_the_fourth_batch)
    with pytest.raises(RuntimeError, match="device lost"):
        extract(data=sample, output=out, **SMALL)
    monkeypatch.undo()
    saved = [h["video"] for h in iter_journal(journal_path(out))]
    assert len(saved) >= 2, "clips whose frames were all in the first three batches are in the journal"
    resumed = extract(data=sample, output=out, **SMALL)
    assert resumed.n_skipped == len(saved) and resumed.n_clips == 16 and not resumed.failed


def test_the_result_says_how_busy_the_backbone_was(sample, tmp_path):
    result = extract(data=sample, output=tmp_path / "c.h5", **SMALL)
    assert result.batch_size == 8
    assert 0 < result.infer_seconds < result.seconds
    assert 0 <= result.starved_seconds < result.seconds


def test_mixed_precision_is_recorded_and_gives_nearly_the_float32_features(sample, tmp_path):
    full = extract(data=sample, output=tmp_path / "f32.h5", **SMALL)
    mixed = extract(data=sample, output=tmp_path / "bf16.h5", precision="mixed_bfloat16", **SMALL)
    a, b = read_all(full.cache), read_all(mixed.cache)
    assert a["attrs"]["precision"] == "float32" and b["attrs"]["precision"] == "mixed_bfloat16"
    assert a["attrs"]["weights_fingerprint"] == b["attrs"]["weights_fingerprint"], "same network, other arithmetic"
    assert b["features"].dtype == np.float16, "storage stays --dtype"
    x, y = a["features"][a["mask"]].astype(np.float32), b["features"][b["mask"]].astype(np.float32)
    scale = np.abs(x).max()
    assert np.abs(x - y).max() < 0.1 * scale and not np.array_equal(x, y)


def test_an_unknown_precision_is_refused_before_any_work(sample, tmp_path):
    with pytest.raises(FeatpipeError, match="^precision must be one of float32, mixed_float16, mixed_bfloat16"):
        extract(data=sample, output=tmp_path / "c.h5", precision="float8", **SMALL)
    assert not (tmp_path / "c.h5").exists()


# ----------------------------------------------------------------------------- a row is the clip as it is now

from featpipe.cache.schema import file_identity  # noqa: E402
from featpipe.errors import OptionError  # noqa: E402
from featpipe.extraction.options import ExtractOptions  # noqa: E402
from mounts import fill, read_only, tmpfs  # noqa: E402

TINY = {**SMALL, "frames": 4}


def tiny_dataset(root: Path, per_class: int = 3, classes=("grow", "shrink")) -> Path:
    for c in classes:
        for i in range(per_class):
            write_video(root / c / f"{c}{i}.mp4", 6, 32, 32)
    return root


def rows(path: Path) -> dict[str, tuple[int, str]]:
    with h5py.File(path, "r") as f:
        return {v: (int(lab), s) for v, lab, s in zip(f["video"].asstr()[:], f["label"][:], f["split"].asstr()[:])}


def test_a_replaced_clip_is_extracted_again_and_a_moved_or_deleted_clip_leaves_no_row(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    out = tmp_path / "c.h5"
    extract(data=data, output=out, **TINY)
    with h5py.File(out, "r") as f:
        before = f["features"][list(f["video"].asstr()[:]).index("grow/grow1.mp4")]
    # replaced
    write_video(data / "grow" / "grow1.mp4", 9, 32, 32, color_fn=lambda i: ((40 * i) % 256, 255 - 20 * i, 90))
    shutil.move(data / "grow" / "grow0.mp4", data / "shrink" / "grow0.mp4")  # relabelled by moving it
    (data / "shrink" / "shrink2.mp4").unlink()  # deleted
    again = extract(data=data, output=out, **TINY)
    assert (again.n_new, again.n_skipped) == (2, 3), "the replaced and the moved clip are extracted, no other"
    got = rows(out)
    assert sorted(got) == sorted(r.video for r in index_dataset(data).records)
    assert got["shrink/grow0.mp4"][0] == 1 and "grow/grow0.mp4" not in got, "one row, labelled shrink"
    with h5py.File(out, "r") as f:
        keys = list(f["video"].asstr()[:])
        assert not np.array_equal(f["features"][keys.index("grow/grow1.mp4")], before)
        assert (f["size"][keys.index("grow/grow1.mp4")], f["mtime_ns"][keys.index("grow/grow1.mp4")]) == file_identity(
            data / "grow" / "grow1.mp4"
        )
        assert sorted(f["stale/video"].asstr()[:]) == ["grow/grow0.mp4", "shrink/shrink2.mp4"]
    assert again.n_dropped == 2
    assert (
        "Dropped 2 row(s) whose clips left the dataset (their names are kept under stale/ in the cache)."
        in again.summary_lines
    )


def test_a_failed_clip_whose_file_was_fixed_is_tried_again_without_retry_failed(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    write_zero_byte(data / "grow" / "late.mp4")
    out = tmp_path / "c.h5"
    first = extract(data=data, output=out, **TINY)
    assert [k for k, _ in first.failed] == ["grow/late.mp4"]
    assert extract(data=data, output=out, **TINY).n_new == 0, "an unchanged broken file is not tried again"
    write_video(data / "grow" / "late.mp4", 6, 32, 32)
    fixed = extract(data=data, output=out, **TINY)
    assert fixed.n_new == 1 and fixed.failed == [] and "grow/late.mp4" in rows(out)


def test_a_cache_of_another_dataset_is_refused_and_the_same_clips_in_a_moved_folder_are_reused(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    out = tmp_path / "c.h5"
    extract(data=data, output=out, **TINY)
    other = tiny_dataset(tmp_path / "other")  # same names, other files
    result = CliRunner().invoke(
        app,
        [
            "extract",
            "--data",
            str(other),
            "--output",
            str(out),
            "--backbone",
            "vgg16",
            "--size",
            "32",
            "--frames",
            "4",
            "--weights",
            "none",
            "--quiet",
        ],
    )
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "looks like another dataset" in message and "--output NEW.h5" in message
    with h5py.File(out, "r") as f:
        assert f.attrs["data_root"] == str(data.resolve()), "data_root never claims a folder it was not extracted from"
    moved = tmp_path / "moved"
    shutil.move(data, moved)
    reused = extract(data=moved, output=out, **TINY)
    assert (reused.n_new, reused.n_skipped) == (0, 6)
    with h5py.File(out, "r") as f:
        assert f.attrs["data_root"] == str(moved.resolve())


def test_a_version_1_cache_is_resumed_without_extracting_its_clips_again(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    out = tmp_path / "c.h5"
    extract(data=data, output=out, **TINY)
    with h5py.File(out, "a") as f:
        for name in ("size", "mtime_ns", "failed/size", "failed/mtime_ns", "stale", "time", "duration", "fps"):
            del f[name]
        f.attrs["schema_version"] = 1
    again = extract(data=data, output=out, **TINY)
    assert (again.n_new, again.n_skipped) == (0, 6)
    with h5py.File(out, "r") as f:
        assert f.attrs["schema_version"] == 4 and (f["size"][:] > 0).all()


def test_broken_clips_that_held_a_class_s_val_share_do_not_leave_that_class_without_val(tmp_path):
    data = tiny_dataset(tmp_path / "data", per_class=6)
    val_grow = [r for r in index_dataset(data).records if r.label == "grow" and r.split == "val"]
    assert val_grow
    for r in val_grow:
        write_zero_byte(r.path)
    out = tmp_path / "c.h5"
    result = extract(data=data, output=out, **TINY)
    splits = {(lab, s) for lab, s in rows(out).values()}
    assert splits == {(c, s) for c in (0, 1) for s in ("train", "val", "test")}, "every class in every split"
    assert any("Split drawn again over the usable clips of grow" in line for line in result.summary_lines)


def test_a_class_that_cannot_be_repaired_is_a_warning_in_the_summary(tmp_path):
    data = tiny_dataset(tmp_path / "data", per_class=3)
    for i in (1, 2):
        write_zero_byte(data / "shrink" / f"shrink{i}.mp4")
    result = extract(data=data, output=tmp_path / "c.h5", **TINY)
    assert "warning: class 'shrink' has only 1 usable clip(s), so it has no val or test clip." in result.summary_lines


# ----------------------------------------------------------------------------- every option checked once


@pytest.mark.parametrize(
    "option, value, words",
    [
        ("size", 0, "size must be between 32 and 1024, got 0"),
        ("size", -5, "size must be between 32 and 1024"),
        ("size", 100000, "size must be between 32 and 1024, got 100000"),
        ("size", 1500, "size must be between 32 and 1024, got 1500"),
        ("frames", 1_000_000_000, "frames must be between 1 and 10000"),
        ("batch_size", 100_000_000, "batch_size must be between 1 and 65536"),
        ("workers", 0, "workers must be between 1 and 256"),
        ("frames", 2.5, "frames must be a whole number"),
        ("val_fraction", float("nan"), "val_fraction must be a finite number"),
        ("shard", "3/2", "shard must look like I/N"),
    ],
)
def test_a_bad_option_is_one_sentence_naming_the_parameter_before_any_work(tmp_path, option, value, words):
    with pytest.raises(OptionError) as info:
        extract(data=tmp_path / "nothing here", output=tmp_path / "c.h5", **{**TINY, option: value})
    assert str(info.value).startswith(words) and "--" not in str(info.value)
    assert not list(tmp_path.iterdir())


def test_what_does_not_fit_in_memory_is_refused_saying_what_fits(monkeypatch):
    monkeypatch.setattr("featpipe.runtime.devices.physical_memory", lambda: 8 << 30)
    with pytest.raises(
        OptionError,
        match=r"^batch_size of 8192 frames at 1024 px needs about .* GiB of memory, more "
        r"than the 6.4 GiB this machine can spare; at most \d+ fit",
    ):
        ExtractOptions(backbone="vgg16", size=1024, batch_size=8192, workers=1)
    with pytest.raises(OptionError, match=r"^frames of 9000 at 1024 px .* at most \d+ frames fit"):
        ExtractOptions(backbone="vgg16", size=1024, frames=9000, workers=2)


def test_data_and_csv_together_are_refused_and_csv_alone_needs_no_data_folder(tmp_path):
    with pytest.raises(OptionError, match="^csv cannot be combined with a data folder"):
        ExtractOptions(data=tmp_path, csv=tmp_path / "x.csv")
    assert ExtractOptions(csv=tmp_path / "x.csv").data_folder is None and ExtractOptions().data_folder == "data"


def _cli(*args: str):
    return cli("extract", *args)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--size", "0"], "error: --size must be between 32 and 1024, got 0"),
        (["--batch-size", "100000000"], "error: --batch-size must be between 1 and 65536"),
        (["--data", "d", "--csv", "x.csv"], "error: --csv cannot be combined with a data folder"),
    ],
)
def test_the_cli_names_the_flag_of_a_bad_option(tmp_path, args, words):
    result = _cli(*args, "--backbone", "vgg16", "--output", str(tmp_path / "c.h5"))
    assert result.exit_code == 2 and result.stderr.strip().startswith(words), result.output


def test_cache_naming_a_file_is_one_sentence(tmp_path):
    (tmp_path / "afile").write_text("x")
    result = _cli("--cache-dir", str(tmp_path / "afile"))
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: --cache-dir must be a folder, but '{tmp_path / 'afile'}' is a file."


def test_the_old_cache_flag_still_names_the_folder_with_a_deprecation_note(tmp_path):
    (tmp_path / "afile").write_text("x")
    result = _cli("--cache", str(tmp_path / "afile"))  # the value reaches --cache-dir: the same refusal
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "note: --cache is deprecated for extract; use --cache-dir",
        f"error: --cache-dir must be a folder, but '{tmp_path / 'afile'}' is a file.",
    ]
    assert "--cache " not in CliRunner().invoke(app, ["extract", "--help"]).output


# ----------------------------------------------------------------------------- signals, full disks, read-only media


@pytest.mark.slow
def test_sigterm_folds_the_journal_into_the_cache_and_exits_143_then_resume_finishes(sample, tmp_path):
    out = tmp_path / "c.h5"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cheap = {"--backbone": "vgg16", "--size": "32", "--batch-size": "1"}  # 128 forward passes: time to stop it mid-run
    cmd = [cheap.get(prev, arg) for prev, arg in zip([""] + _extract_cmd(sample, out), _extract_cmd(sample, out))]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _records(out) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "run the same command again to resume" in stderr and "Traceback" not in stderr
    assert not journal_path(out).exists(), "the journal was folded into the cache"
    kept = summarize(out).n_clips
    assert kept >= 2
    resumed = extract(
        data=sample,
        output=out,
        backbone="vgg16",
        size=32,
        frames=8,
        weights="none",
        batch_size=1,
        workers=1,
        quiet=True,
    )  # the same settings as cmd
    assert resumed.n_skipped == kept and resumed.n_clips == 16


def test_a_full_disk_while_journaling_is_one_sentence_exit_1_and_the_rerun_resumes(tmp_path, monkeypatch):
    import errno

    from featpipe.cache.journal import JournalWriter

    data = tiny_dataset(tmp_path / "data")
    out = tmp_path / "c.h5"
    real_append = JournalWriter.append
    calls = []

    def append_until_full(self, rec):
        calls.append(rec.video)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_append(self, rec)

    monkeypatch.setattr(JournalWriter, "append", append_until_full)
    result = _cli(
        "--data",
        str(data),
        "--output",
        str(out),
        "--backbone",
        "vgg16",
        "--size",
        "32",
        "--frames",
        "4",
        "--weights",
        "none",
        "--workers",
        "1",
        "--quiet",
    )
    monkeypatch.undo()
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == (
        f"error: The disk holding '{tmp_path}' is full; free some space and run the same "
        f"command again (the clips finished so far are kept)."
    )
    assert not out.exists() and len(list(iter_journal(journal_path(out)))) == 2
    assert not list(tmp_path.glob("*.tmp-*"))
    resumed = extract(data=data, output=out, **TINY)
    assert (resumed.n_new, resumed.n_skipped, resumed.n_clips) == (4, 2, 6)


def test_a_full_disk_while_writing_the_cache_keeps_the_old_cache_and_the_journal(tmp_path, monkeypatch):
    with tmpfs(tmp_path / "disk", "2m") as disk:
        data = tiny_dataset(disk / "data")
        out = disk / "c.h5"
        extract(data=data, output=out, **TINY)
        old = out.read_bytes()
        write_video(data / "grow" / "new.mp4", 6, 32, 32)
        real_finalize = CacheWriter.finalize
        filler = []

        def fill_then_finalize(self, *args, **kwargs):
            filler.append(fill(disk))
            return real_finalize(self, *args, **kwargs)

        monkeypatch.setattr(CacheWriter, "finalize", fill_then_finalize)
        with pytest.raises(CacheError, match="is full; free some space and run the same command again") as info:
            extract(data=data, output=out, **TINY)
        monkeypatch.undo()
        assert info.value.exit_code == 1
        assert out.read_bytes() == old and [h["video"] for h in iter_journal(journal_path(out))] == ["grow/new.mp4"]
        assert not list(disk.glob("*.tmp-*"))
        filler[0].unlink()
        assert extract(data=data, output=out, **TINY).n_clips == 7


def test_a_finished_cache_on_read_only_media_succeeds_when_nothing_is_left_and_says_so_otherwise(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    with tmpfs(tmp_path / "media", "2m") as media:
        out = media / "c.h5"
        extract(data=data, output=out, **TINY)
        (media / "c.h5.lock").unlink()
        with read_only(media):
            done = extract(data=data, output=out, **TINY)
            assert (done.n_new, done.n_skipped) == (0, 6)
            assert any("read-only, but nothing was left to do" in line for line in done.summary_lines)
            write_video(data / "grow" / "new.mp4", 6, 32, 32)
            with pytest.raises(
                CacheError,
                match=r"Cannot write to .* \(read-only\), and the cache is not up to date "
                r"\(1 clip\(s\) to extract",
            ):
                extract(data=data, output=out, **TINY)
            with pytest.raises(CacheError, match=f"Cannot write to '{media}'"):
                extract(data=data, output=media / "new.h5", **TINY)
