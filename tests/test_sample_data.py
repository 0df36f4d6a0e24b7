"""featpipe.video.sample_data: the synthetic, order-only-separable demo dataset."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

import featpipe.video.sample_data as sd
from featpipe.errors import DatasetError, FeatpipeError
from featpipe.video.decode import read_clip
from featpipe.video.sample_data import (
    MARKER_NAME,
    SAMPLE_CLASSES,
    SPLITS,
    SampleData,
    render_clip,
    sample_clip_specs,
    write_sample_data,
)

SMALL = {"train": 2, "val": 1, "test": 1}
PAIRS = (("grow", "shrink"), ("red_to_blue", "blue_to_red"))


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> SampleData:
    return write_sample_data(tmp_path_factory.mktemp("sample") / "data", **SMALL)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- layout


def test_classes_are_sorted_and_paired():
    assert SAMPLE_CLASSES == ("blue_to_red", "grow", "red_to_blue", "shrink")
    assert list(SAMPLE_CLASSES) == sorted(SAMPLE_CLASSES)


def test_split_class_layout_and_counts(small_set):
    root = small_set.root
    assert small_set.class_names == SAMPLE_CLASSES
    assert small_set.counts == {"train": 8, "val": 4, "test": 4}
    assert small_set.n_clips == 16
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(SPLITS)
    for split in SPLITS:
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(SAMPLE_CLASSES)
        for class_name in SAMPLE_CLASSES:
            names = sorted(p.name for p in (root / split / class_name).iterdir())
            expected = [f"{class_name}_{split}_{i:03d}.mp4" for i in range(SMALL[split])]
            assert names == expected
    assert (root / MARKER_NAME).is_file()


def test_marker_records_parameters_and_files(small_set):
    marker = json.loads((small_set.root / MARKER_NAME).read_text(encoding="utf-8"))
    assert marker["params"] == {**SMALL, "seed": 0}
    assert marker["complete"] is True
    assert sorted(marker["files"]) == sorted(str(p.relative_to(small_set.root)) for p in small_set.root.rglob("*.mp4"))


def test_every_clip_decodes_with_read_clip_as_specified(small_set):
    specs = {s.relpath: s for s in sample_clip_specs(**SMALL)}
    assert len(specs) == 16
    for relpath, spec in specs.items():
        clip = read_clip(small_set.root / relpath, 20, 32)
        assert clip.n_frames == spec.n_frames
        assert (clip.width, clip.height) == (spec.width, spec.height)
        assert clip.fps == pytest.approx(spec.fps)
        assert clip.mask.sum() == min(20, spec.n_frames)


def test_small_set_files_are_small(small_set):
    sizes = [p.stat().st_size for p in small_set.root.rglob("*.mp4")]
    assert max(sizes) < 200_000


# ------------------------------------------------------------------------ variety


def test_default_parameters_mix_lengths_resolutions_and_fps_in_every_class():
    specs = sample_clip_specs()
    assert len(specs) == 4 * (16 + 6 + 6)
    for class_name in SAMPLE_CLASSES:
        mine = [s for s in specs if s.class_name == class_name]
        lengths = [s.n_frames for s in mine]
        assert min(lengths) >= 6 and max(lengths) <= 80
        assert sum(n < 20 for n in lengths) >= 5 and sum(n > 20 for n in lengths) >= 5
        assert max(lengths) >= 3 * 20  # several times the default sequence length
        assert {(s.width, s.height) for s in mine} == {(160, 120), (120, 160), (192, 108), (128, 128)}
        assert {s.fps for s in mine} == {10.0, 15.0, 24.0, 30.0}
    for split in SPLITS:
        lengths = [s.n_frames for s in specs if s.split == split]
        assert min(lengths) < 20 < max(lengths), split


def test_small_sets_still_mix_short_and_long_clips(small_set):
    for class_name in SAMPLE_CLASSES:
        mine = [s for s in sample_clip_specs(**SMALL) if s.class_name == class_name]
        assert any(s.n_frames < 20 for s in mine) and any(s.n_frames > 20 for s in mine)
        assert len({(s.width, s.height) for s in mine}) == 4
        assert len({s.fps for s in mine}) == 4


def test_disc_is_big_and_stays_inside_the_centre_crop():
    for spec in sample_clip_specs(train=50, val=0, test=0, seed=3):
        largest = max(spec.radius_start, spec.radius_end)
        assert largest >= 0.3
        assert abs(spec.offset[0]) + largest <= 0.5 and abs(spec.offset[1]) + largest <= 0.5


# ------------------------------------------------------------------- determinism


def test_same_seed_gives_same_parameters_and_other_seed_differs():
    assert sample_clip_specs(seed=5) == sample_clip_specs(seed=5)
    assert sample_clip_specs(seed=5) != sample_clip_specs(seed=6)


def test_same_seed_gives_same_decoded_frames(tmp_path):
    a = write_sample_data(tmp_path / "a", train=1, val=0, test=0, seed=11)
    b = write_sample_data(tmp_path / "b", train=1, val=0, test=0, seed=11)
    rel = sorted(str(p.relative_to(a.root)) for p in a.root.rglob("*.mp4"))
    assert rel == sorted(str(p.relative_to(b.root)) for p in b.root.rglob("*.mp4"))
    for r in rel:
        fa, fb = read_clip(a.root / r, 8, 32), read_clip(b.root / r, 8, 32)
        assert np.array_equal(fa.frames, fb.frames) and fa.n_frames == fb.n_frames


# ---------------------------------------------------------------- order-only classes


def _disc_area_and_colour(rgb: np.ndarray) -> tuple[float, np.ndarray]:
    """Fraction of the frame covered by the disc and the disc's mean RGB colour."""
    frame = rgb.astype(np.float64)
    background = frame[:3, :3].reshape(-1, 3).mean(axis=0)  # corners are background
    disc = np.abs(frame - background).sum(axis=2) > 80
    return disc.mean(), frame[disc].mean(axis=0)


def test_pairs_are_time_reversed_in_the_written_clips(small_set):
    for spec in sample_clip_specs(**SMALL):
        clip = read_clip(small_set.root / spec.relpath, 2, 64)  # first and last frame
        (area0, rgb0), (area1, rgb1) = (_disc_area_and_colour(f) for f in clip.frames)
        if spec.class_name == "grow":
            assert area1 > 2 * area0, spec.relpath
        elif spec.class_name == "shrink":
            assert area0 > 2 * area1, spec.relpath
        elif spec.class_name == "red_to_blue":
            assert rgb0[0] > rgb0[2] + 100 and rgb1[2] > rgb1[0] + 100, spec.relpath
        else:
            assert rgb0[2] > rgb0[0] + 100 and rgb1[0] > rgb1[2] + 100, spec.relpath


def test_reversed_class_is_the_forward_clip_played_backwards():
    specs = sample_clip_specs(train=2, val=0, test=0, seed=4)
    for forward, backward in PAIRS:
        for spec in (s for s in specs if s.class_name == forward):
            played_back = list(render_clip(replace(spec, class_name=backward, reverse=True)))
            assert len(played_back) == spec.n_frames
            for a, b in zip(list(render_clip(spec))[::-1], played_back):
                assert np.array_equal(a, b)


def test_pair_classes_draw_parameters_from_the_same_distribution():
    # Without frame order the two classes of a pair must be indistinguishable: every
    # order-free parameter has the same distribution (two-sample z-test on the means over
    # 300 clips per class; a different range or offset would give |z| in the tens).
    specs = sample_clip_specs(train=300, val=0, test=0, seed=1)
    fields = ("radius_start", "radius_end", "n_frames", "noise", "color_start", "color_end", "background")
    for forward, backward in PAIRS:
        f = [s for s in specs if s.class_name == forward]
        b = [s for s in specs if s.class_name == backward]
        assert all(not s.reverse for s in f) and all(s.reverse for s in b)
        for field in fields:
            x = np.array([getattr(s, field) for s in f], dtype=float)
            y = np.array([getattr(s, field) for s in b], dtype=float)
            se = np.sqrt(x.var(axis=0) / len(x) + y.var(axis=0) / len(y)) + 1e-9
            z = np.abs(x.mean(axis=0) - y.mean(axis=0)) / se
            assert np.all(z < 5), (forward, field, z)
        assert Counter((s.width, s.height) for s in f) == Counter((s.width, s.height) for s in b)
        assert Counter(s.fps for s in f) == Counter(s.fps for s in b)


# ------------------------------------------------------------ idempotence and safety


def test_second_call_with_same_parameters_rewrites_nothing(small_set, monkeypatch):
    before = _files(small_set.root)

    def must_not_write(*args, **kwargs):
        raise AssertionError("sample data was rewritten")

    monkeypatch.setattr(sd, "_write_clip", must_not_write)
    again = write_sample_data(small_set.root, **SMALL)
    assert again == small_set
    assert _files(small_set.root) == before


def test_missing_clip_is_rewritten_without_overwrite(tmp_path):
    data = write_sample_data(tmp_path / "data", train=1, val=0, test=0)
    victim = data.root / "train" / "grow" / "grow_train_000.mp4"
    victim.unlink()
    write_sample_data(data.root, train=1, val=0, test=0)
    assert read_clip(victim, 4, 16).n_frames > 0


def test_interrupted_write_is_finished_by_the_next_call(tmp_path, monkeypatch):
    root = tmp_path / "data"
    real_write = sd._write_clip
    written = []

    def fail_after_two(spec, path):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(path)
        real_write(spec, path)

    monkeypatch.setattr(sd, "_write_clip", fail_after_two)
    with pytest.raises(KeyboardInterrupt):
        write_sample_data(root, train=1, val=0, test=0)
    monkeypatch.setattr(sd, "_write_clip", real_write)
    data = write_sample_data(root, train=1, val=1, test=0)  # other parameters: still ours
    assert json.loads((root / MARKER_NAME).read_text())["complete"] is True
    assert len(list(root.rglob("*.mp4"))) == data.n_clips == 8


def test_refuses_a_foreign_non_empty_folder(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="--overwrite") as info:
        write_sample_data(root, **SMALL)
    assert str(root) in str(info.value)
    assert [p.name for p in root.iterdir()] == ["notes.txt"]


def test_refuses_sample_data_written_with_other_parameters(tmp_path):
    root = write_sample_data(tmp_path / "data", train=1, val=0, test=0).root
    before = _files(root)
    with pytest.raises(DatasetError, match="other parameters"):
        write_sample_data(root, train=1, val=0, test=0, seed=1)
    assert _files(root) == before


def test_overwrite_replaces_only_generator_files(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    (root / "train").mkdir()
    (root / "train" / "stale.mp4").write_bytes(b"old")
    data = write_sample_data(root, train=1, val=0, test=0, overwrite=True)
    assert (root / "notes.txt").read_text() == "keep me"
    assert (root / "train" / "stale.mp4").read_bytes() == b"old", "a file featpipe did not write is never deleted"
    assert len(list(root.rglob("*.mp4"))) == data.n_clips + 1 == 5
    # and with other parameters, overwrite rewrites them
    data = write_sample_data(root, train=1, val=0, test=1, seed=2, overwrite=True)
    marker = json.loads((root / MARKER_NAME).read_text())
    assert marker["params"] == {"train": 1, "val": 0, "test": 1, "seed": 2}
    assert len(list(root.rglob("*.mp4"))) == data.n_clips + 1 == 9
    assert (root / "notes.txt").exists() and (root / "train" / "stale.mp4").exists()


def test_overwrite_never_deletes_a_users_own_class_folder(tmp_path):
    root = write_sample_data(tmp_path / "data", train=1, val=1, test=0).root
    cats = root / "train" / "cats"
    cats.mkdir()
    (cats / "cat_001.mp4").write_bytes(b"my own clip")
    (cats / "notes.txt").write_text("where I filmed them")
    (root / "val" / "grow" / "mine.txt").write_text("a note inside a generated class folder")
    write_sample_data(root, train=0, val=0, test=1, seed=3, overwrite=True)
    assert (cats / "cat_001.mp4").read_bytes() == b"my own clip"
    assert (cats / "notes.txt").read_text() == "where I filmed them"
    assert (root / "val" / "grow" / "mine.txt").exists()
    # the generator's own clips of the old parameters are gone, and so are the folders it created
    assert not list((root / "train").rglob("*_train_*.mp4"))
    assert not (root / "train" / "grow").exists() and not (root / "val" / "shrink").exists()
    assert sorted(p.name for p in (root / "train").iterdir()) == ["cats"]
    assert len(list((root / "test").rglob("*.mp4"))) == 4


def test_overwrite_refuses_to_replace_a_users_file_where_a_clip_goes(tmp_path):
    root = tmp_path / "data"
    (root / "train" / "grow").mkdir(parents=True)
    mine = root / "train" / "grow" / "grow_train_000.mp4"
    mine.write_bytes(b"my clip, same name")
    with pytest.raises(DatasetError, match="did not write it"):
        write_sample_data(root, train=1, val=0, test=0, overwrite=True)
    assert mine.read_bytes() == b"my clip, same name"
    assert not (root / MARKER_NAME).exists()


def test_an_edited_marker_never_makes_overwrite_delete_other_files(tmp_path):
    root = write_sample_data(tmp_path / "data", train=1, val=0, test=0).root
    (root / "keep.txt").write_text("mine")
    (tmp_path / "outside.txt").write_text("mine too")
    marker = json.loads((root / MARKER_NAME).read_text())
    marker["files"] += ["keep.txt", "../outside.txt", "/etc/hostname"]
    marker["folders"] += ["..", "."]
    (root / MARKER_NAME).write_text(json.dumps(marker))
    write_sample_data(root, train=1, val=0, test=0, seed=5, overwrite=True)
    assert (root / "keep.txt").exists() and (tmp_path / "outside.txt").exists()


def test_existing_empty_folder_is_used(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    assert write_sample_data(root, train=1, val=0, test=0).n_clips == 4


def test_root_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "data"
    path.write_text("x")
    with pytest.raises(DatasetError, match="is a file"):
        write_sample_data(path, train=1, val=0, test=0)


def test_root_with_spaces_and_non_ascii(tmp_path):
    data = write_sample_data(tmp_path / "dönnées d'essai", train=1, val=0, test=0)
    for p in data.root.rglob("*.mp4"):
        assert read_clip(p, 4, 16).n_frames >= 6


@pytest.mark.parametrize(
    "counts, says",
    [
        ({"train": -1}, "train must be between 0 and 10000, got -1"),
        ({"train": 0, "val": 0, "test": 0}, "train, val and test are all 0"),
        ({"val": 1.5}, "val must be a whole number"),
        ({"train": 1_000_000_000}, "train must be between 0 and 10000"),
        ({"seed": -1}, "seed must be"),
    ],
)
def test_bad_counts_are_rejected(tmp_path, counts, says):
    with pytest.raises(ValueError, match=says) as info:  # an OptionError: a FeatpipeError and a ValueError
        write_sample_data(tmp_path / "x", **counts)
    assert isinstance(info.value, FeatpipeError) and info.value.exit_code == 2
    assert "--" not in str(info.value), "the Python API names parameters, not flags"
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "args, says",
    [
        (["--train", "-1"], "--train must be between 0 and 10000, got -1."),
        (["--train", "0", "--val", "0", "--test", "0"], "--train, --val and --test are all 0"),
        (["--seed", "-3"], "--seed must be at least 0, got -3."),
        (["--seed", "-3", "--difficulty", "hard"], "--seed must be at least 0, got -3."),
        (["--train", "-1", "--difficulty", "hard"], "--train must be between 0 and 10000, got -1."),
        (["--train", "1000000000"], "--train must be between 0 and 10000, got 1000000000."),
    ],
)
def test_cli_refuses_bad_counts_with_one_sentence(tmp_path, args, says):
    from typer.testing import CliRunner

    from featpipe.cli import app

    result = CliRunner().invoke(app, ["sample-data", str(tmp_path / "x"), *args])
    assert result.exit_code == 2
    assert says in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_writer_that_does_not_open_raises_featpipe_error(tmp_path, monkeypatch):
    class ClosedWriter:
        def __init__(self, *args, **kwargs):
            pass

        def isOpened(self):  # noqa: N802 (OpenCV's name)
            return False

        def release(self):
            pass

    monkeypatch.setattr(cv2, "VideoWriter", ClosedWriter)
    with pytest.raises(FeatpipeError, match="mp4v"):
        write_sample_data(tmp_path / "data", train=1, val=0, test=0)


def test_unreadable_written_clip_raises_featpipe_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sd, "count_frames", lambda path: 0)
    with pytest.raises(FeatpipeError, match="written with"):
        write_sample_data(tmp_path / "data", train=1, val=0, test=0)


# ---------------------------------------------------------------- the hard preset


def test_hard_preset_writes_the_same_layout_with_hard_clips_and_records_its_difficulty(tmp_path):
    result = write_sample_data(tmp_path / "hard", train=1, val=0, test=1, difficulty="hard")
    assert result.class_names == SAMPLE_CLASSES and result.counts == {"train": 4, "val": 0, "test": 4}
    marker = json.loads((tmp_path / "hard" / MARKER_NAME).read_text(encoding="utf-8"))
    assert marker["params"]["difficulty"] == "hard" and marker["complete"] is True
    for clip in marker["clips"]:
        assert clip["distractors"] and clip["noise"] >= 6
        decoded = read_clip(tmp_path / "hard" / clip["relpath"], 200, 32)
        assert decoded.n_frames == clip["n_frames"]
    # the easy set in the same folder is "other parameters": refused without --overwrite
    with pytest.raises(DatasetError, match="other parameters"):
        write_sample_data(tmp_path / "hard", train=1, val=0, test=1)


def test_hard_preset_mixes_lengths_up_to_150_frames_with_noise_and_moving_parts():
    specs = sd.hard_clip_specs(train=16, val=6, test=6, seed=0)
    lengths = [s.n_frames for s in specs]
    assert min(lengths) <= 12 and 100 < max(lengths) <= 150
    assert all(s.path_start != s.path_end for s in specs), "the target moves"
    assert {len(s.distractors) for s in specs} == {1, 2, 3}
    assert len({s.background for s in specs}) > len(specs) // 2, "varied backgrounds"
    assert sd.hard_clip_specs(train=2, val=0, test=0, seed=1) == sd.hard_clip_specs(train=2, val=0, test=0, seed=1)
    assert sd.hard_clip_specs(train=2, val=0, test=0, seed=1) != sd.hard_clip_specs(train=2, val=0, test=0, seed=2)


def test_hard_reversed_class_is_the_forward_clip_played_backwards():
    specs = [s for s in sd.hard_clip_specs(train=1, val=0, test=0, seed=3) if s.n_frames <= 60][:2]
    specs = specs or sd.hard_clip_specs(train=1, val=0, test=0, seed=3)[:1]
    for spec in specs:
        frames = list(render_clip(spec))
        consecutive = [np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(frames, frames[1:])]
        assert min(consecutive) > 2, "per-frame noise: no two frames are alike"
        played_back = list(render_clip(replace(spec, reverse=not spec.reverse)))
        for a, b in zip(frames[::-1], played_back):
            assert np.array_equal(a, b)


def test_unknown_difficulty_is_refused_naming_the_choices(tmp_path):
    with pytest.raises(FeatpipeError, match="difficulty must be one of easy, hard"):
        write_sample_data(tmp_path / "x", train=1, val=0, test=0, difficulty="medium")
    assert not (tmp_path / "x").exists()
