"""featpipe.video.datasets: layouts, the splits they are indexed with, and helpful errors.

Indexing never decodes, so every clip here is a zero-byte placeholder file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from dataset_trees import class_tree, splits_of, touch, ucf_tree, write_csv
from featpipe.errors import DatasetError, FeatpipeError
from featpipe.names import SPLITS
from featpipe.video.datasets import LAYOUTS, index_dataset
from featpipe.video.folders import VIDEO_EXTENSIONS

# ------------------------------------------------------------------------------------------------
# constants and records


def test_only_video_extensions_are_indexed_and_every_split_is_a_known_one(tmp_path):
    touch(
        tmp_path,
        *(f"{c}/clip{i}{e}" for c in "ab" for i, e in enumerate(sorted(VIDEO_EXTENSIONS))),
        "a/notes.txt",
        "b/frame.jpg",
    )
    ds = index_dataset(tmp_path)
    assert len(ds.records) == 2 * len(VIDEO_EXTENSIONS)
    assert all(Path(r.video).suffix in VIDEO_EXTENSIONS for r in ds.records)
    assert {r.split for r in ds.records} <= set(SPLITS) and ds.layout in LAYOUTS


def test_indexing_does_not_import_video_or_model_libraries():
    code = (
        "import sys, featpipe.video.datasets; "
        "bad = [m for m in ('cv2', 'keras', 'tensorflow') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# ------------------------------------------------------------------------------------------------
# split-folders


def test_split_folders_layout_uses_folder_splits_and_nested_clips(tmp_path):
    touch(
        tmp_path,
        "train/cat/a.mp4",
        "train/cat/deeper/b.mp4",
        "train/dog/c.mp4",
        "val/dog/d.mp4",
        "test/cat/e.mp4",
        "test/bird/f.mp4",
    )
    ds = index_dataset(tmp_path)
    assert ds.layout == "split-folders"
    assert ds.root == tmp_path.resolve()
    assert ds.class_names == ("bird", "cat", "dog")
    assert [(r.video, r.label, r.split) for r in ds.records] == [
        ("test/bird/f.mp4", "bird", "test"),
        ("test/cat/e.mp4", "cat", "test"),
        ("train/cat/a.mp4", "cat", "train"),
        ("train/cat/deeper/b.mp4", "cat", "train"),
        ("train/dog/c.mp4", "dog", "train"),
        ("val/dog/d.mp4", "dog", "val"),
    ]
    assert all(r.path.is_absolute() and r.path == tmp_path.resolve() / r.video for r in ds.records)


def test_split_folders_with_only_a_train_folder_is_accepted(tmp_path):
    touch(tmp_path, "train/a/1.mp4", "train/b/2.mp4")
    ds = index_dataset(tmp_path)
    assert ds.layout == "split-folders"
    assert {r.split for r in ds.records} == {"train"}
    assert ds.counts() == {"train": {"a": 1, "b": 1}}


def test_counts_lists_only_splits_with_clips_and_every_class_in_each(tmp_path):
    touch(tmp_path, "train/a/1.mp4", "train/a/2.mp4", "train/b/3.mp4", "test/b/4.mp4")
    ds = index_dataset(tmp_path)
    assert ds.counts() == {"train": {"a": 2, "b": 1}, "test": {"a": 0, "b": 1}}


def test_label_index_is_the_position_in_sorted_class_names(tmp_path):
    ds = index_dataset(class_tree(tmp_path, {"zebra": 1, "ant": 1, "moose": 1}))
    assert ds.class_names == ("ant", "moose", "zebra")
    assert [ds.label_index(c) for c in ("ant", "moose", "zebra")] == [0, 1, 2]
    with pytest.raises(DatasetError, match="'giraffe' is not one of this dataset's 3 classes"):
        ds.label_index("giraffe")


def test_split_folders_mixed_with_class_folders_is_refused(tmp_path):
    touch(tmp_path, "train/a/1.mp4", "train/b/2.mp4", "cat/3.mp4")
    with pytest.raises(DatasetError, match=r"mixes split folders \(train\) with other clips or folders \(cat\)"):
        index_dataset(tmp_path)


def test_clip_loose_in_a_split_folder_is_refused(tmp_path):
    touch(tmp_path, "train/a/1.mp4", "train/b/2.mp4", "train/loose.mp4")
    with pytest.raises(
        DatasetError, match=r"'train/loose.mp4'.*not inside a class folder; move it into train/<class>/"
    ):
        index_dataset(tmp_path)


# ------------------------------------------------------------------------------------------------
# class-folders


def test_class_folders_layout_is_detected_and_split(tmp_path):
    ds = index_dataset(class_tree(tmp_path, {"a": 20, "b": 20}))
    assert ds.layout == "class-folders"
    assert ds.class_names == ("a", "b")
    assert len(ds.records) == 40
    assert ds.counts() == {s: {"a": n, "b": n} for s, n in (("train", 14), ("val", 3), ("test", 3))}


def test_extensions_are_case_insensitive_and_other_files_are_ignored(tmp_path):
    touch(
        tmp_path,
        "a/one.MP4",
        "a/two.Avi",
        "a/three.mkv",
        "a/notes.txt",
        "a/thumb.jpg",
        "a/.hidden.mp4",
        "a/.cache/four.mp4",
        "b/five.WEBM",
        "b/six.mpeg",
        "b/noext",
        ".trash/seven.mp4",
        "README.md",
    )
    ds = index_dataset(tmp_path, val_fraction=0, test_fraction=0)
    assert ds.class_names == ("a", "b")
    assert [r.video for r in ds.records] == ["a/one.MP4", "a/three.mkv", "a/two.Avi", "b/five.WEBM", "b/six.mpeg"]


def test_keys_and_extensions_follow_pathlib_for_odd_names_nested_and_linked_folders(tmp_path):
    """Indexing tells videos and makes keys by string (a Path per clip made large folders slow): the result
    is what ``Path.suffix`` and ``relative_to(root).as_posix()`` give, for any name."""
    names = ["a.b.mkv", "..mp4", "trailing.", "mp4", "x.MP4", "sp ace.avi", "ünï cödé.webm", "a.mp4.txt", "b.tar.mpg"]
    touch(tmp_path / "data", *(f"cls/deep/er/{n}" for n in names), *(f"other/{n}" for n in names))
    (tmp_path / "elsewhere").mkdir()
    touch(tmp_path / "elsewhere", "linked.mov", "linked.txt")
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "other" / "link")
    ds = index_dataset(tmp_path / "data", val_fraction=0, test_fraction=0)
    root = (tmp_path / "data").resolve()
    expected = sorted(
        f"{folder}/{n}"
        for folder in ("cls/deep/er", "other")
        for n in names
        if Path(n).suffix.lower() in VIDEO_EXTENSIONS and not n.startswith(".")
    )
    assert [r.video for r in ds.records] == sorted(expected + ["other/link/linked.mov"])
    for r in ds.records:
        assert r.video == r.path.relative_to(root).as_posix() and r.path == root / r.video


def test_every_accepted_extension_is_indexed(tmp_path):
    exts = sorted(VIDEO_EXTENSIONS)
    touch(tmp_path, *(f"a/clip{e}" for e in exts), *(f"b/clip{e.upper()}" for e in exts))
    ds = index_dataset(tmp_path)
    assert len(ds.records) == 2 * len(exts)


def test_same_file_name_in_two_class_folders_gets_distinct_keys(tmp_path):
    touch(tmp_path, "a/clip.mp4", "b/clip.mp4")
    ds = index_dataset(tmp_path)
    assert [r.video for r in ds.records] == ["a/clip.mp4", "b/clip.mp4"]
    assert len({r.path for r in ds.records}) == 2


def test_records_are_sorted_by_video_and_identical_across_calls(tmp_path):
    class_tree(tmp_path, {"b": 7, "a": 9, "c": 5})
    first = index_dataset(tmp_path)
    second = index_dataset(tmp_path)
    assert [r.video for r in first.records] == sorted(r.video for r in first.records)
    assert first == second


def test_stratified_split_puts_every_class_in_every_split_with_expected_counts(tmp_path):
    ds = index_dataset(class_tree(tmp_path, {"a": 10, "b": 3, "c": 7}))
    # round-half-up: a: test 1.5->2 val 2 ; b: 0.45->0 but >=3 clips so 1/1 ; c: 1.05->1 each
    assert ds.counts() == {
        "train": {"a": 6, "b": 1, "c": 5},
        "val": {"a": 2, "b": 1, "c": 1},
        "test": {"a": 2, "b": 1, "c": 1},
    }


def test_stratified_split_is_identical_for_the_same_seed_and_differs_for_another(tmp_path):
    class_tree(tmp_path, {"a": 30, "b": 30})
    one = splits_of(index_dataset(tmp_path, seed=7))
    again = splits_of(index_dataset(tmp_path, seed=7))
    other = splits_of(index_dataset(tmp_path, seed=8))
    assert one == again
    assert one != other
    assert Counter(one.values()) == Counter(other.values())  # same sizes, different clips


def test_stratified_split_is_identical_in_a_fresh_process(tmp_path):
    class_tree(tmp_path, {"a": 12, "b": 9})
    here = splits_of(index_dataset(tmp_path, seed=99))
    code = (
        "import json, sys; from featpipe.video.datasets import index_dataset; "
        "ds = index_dataset(sys.argv[1], seed=99); "
        "print(json.dumps({r.video: r.split for r in ds.records}))"
    )
    env_out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert json.loads(env_out.stdout) == here


def test_no_clip_lands_in_two_splits(tmp_path):
    class_tree(tmp_path, {"a": 11, "b": 4, "c": 2})
    ds = index_dataset(tmp_path, val_fraction=0.3, test_fraction=0.3)
    videos = [r.video for r in ds.records]
    assert len(videos) == len(set(videos)) == 17
    assert sum(sum(per.values()) for per in ds.counts().values()) == 17


def test_class_with_single_clip_goes_to_train(tmp_path):
    ds = index_dataset(class_tree(tmp_path, {"big": 10, "solo": 1, "pair": 2}))
    counts = ds.counts()
    assert counts["train"]["solo"] == 1 and counts["val"]["solo"] == 0 and counts["test"]["solo"] == 0
    assert counts["train"]["pair"] == 2


def test_zero_fractions_put_everything_in_train(tmp_path):
    ds = index_dataset(class_tree(tmp_path, {"a": 5, "b": 5}), val_fraction=0, test_fraction=0)
    assert ds.counts() == {"train": {"a": 5, "b": 5}}


# ------------------------------------------------------------------------------------------------
# csv


def test_csv_layout_splits_stratified_without_split_column(tmp_path):
    rows = "".join(f"clips/{c}{i}.mp4,{c}\n" for c in ("run", "jump") for i in range(10))
    csv = write_csv(tmp_path / "meta" / "train.csv", "video_name,tag\n" + rows.replace("clips/", "../meta/clips/"))
    for c in ("run", "jump"):
        touch(tmp_path / "meta", *(f"clips/{c}{i}.mp4" for i in range(10)))
    ds = index_dataset("does-not-matter", csv=csv)
    assert ds.layout == "csv"
    assert ds.root == (tmp_path / "meta").resolve()
    assert ds.class_names == ("jump", "run")
    assert ds.records[0].video == "clips/jump0.mp4"  # '../meta/clips/x' normalises inside the folder
    assert ds.records[0].path == (tmp_path / "meta" / "clips" / "jump0.mp4").resolve()
    assert ds.counts() == {s: {"jump": n, "run": n} for s, n in (("train", 6), ("val", 2), ("test", 2))}


def test_csv_split_matches_class_folder_split_for_same_keys(tmp_path):
    class_tree(tmp_path / "folders", {"a": 9, "b": 8})
    from_folders = splits_of(index_dataset(tmp_path / "folders", seed=11))
    lines = "".join(f"{k},{k.split('/')[0]}\n" for k in sorted(from_folders))
    csv = write_csv(tmp_path / "folders" / "list.csv", "video_name,tag\n" + lines)
    assert splits_of(index_dataset(csv=csv, seed=11)) == from_folders


def test_csv_split_column_is_honoured_and_extra_columns_ignored(tmp_path):
    csv = write_csv(
        tmp_path / "list.csv",
        "Unnamed: 0,video_name,tag,split,notes\n"
        "0,a1.mp4,a,train,x\n"
        "1,a2.mp4,a,VAL ,y\n"
        "2,b1.mp4,b,test,z\n"
        "3,b2.avi,b,train,\n",
    )
    ds = index_dataset(csv=csv)
    assert [(r.video, r.label, r.split) for r in ds.records] == [
        ("a1.mp4", "a", "train"),
        ("a2.mp4", "a", "val"),
        ("b1.mp4", "b", "test"),
        ("b2.avi", "b", "train"),
    ]


def test_csv_rows_whose_file_is_missing_are_still_indexed(tmp_path):
    touch(tmp_path, "here.mp4")
    csv = write_csv(tmp_path / "list.csv", "video_name,tag\nhere.mp4,a\ngone.mp4,b\n")
    ds = index_dataset(csv=csv)
    assert [(r.video, r.path.exists()) for r in ds.records] == [("gone.mp4", False), ("here.mp4", True)]


def test_csv_keeps_labels_like_na_as_text(tmp_path):
    csv = write_csv(tmp_path / "list.csv", "video_name,tag\n1.mp4,NA\n2.mp4,None\n3.mp4,0\n")
    assert index_dataset(csv=csv).class_names == ("0", "NA", "None")


def test_csv_path_escaping_with_dotdot_is_refused(tmp_path):
    csv = write_csv(tmp_path / "sub" / "list.csv", "video_name,tag\nok.mp4,a\n../x.mp4,b\n")
    with pytest.raises(DatasetError, match=r"line 3 names '\.\./x\.mp4', which lies outside .*move the clip inside"):
        index_dataset(csv=csv)


def test_csv_absolute_path_is_refused(tmp_path):
    target = tmp_path / "sub" / "abs.mp4"
    touch(tmp_path, "sub/abs.mp4")
    csv = write_csv(tmp_path / "sub" / "list.csv", f"video_name,tag\nok.mp4,a\n{target},b\n")
    with pytest.raises(
        DatasetError, match=r"line 3 names the absolute path '.*abs\.mp4'; video paths must be relative"
    ):
        index_dataset(csv=csv)


def test_csv_symlink_resolving_outside_the_folder_is_refused(tmp_path):
    touch(tmp_path, "outside/secret.mp4")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "link.mp4").symlink_to(tmp_path / "outside" / "secret.mp4")
    csv = write_csv(tmp_path / "sub" / "list.csv", "video_name,tag\nok.mp4,a\nlink.mp4,b\n")
    with pytest.raises(DatasetError, match="'link.mp4', which lies outside"):
        index_dataset(csv=csv)


def test_csv_bad_split_value_names_the_value_and_row(tmp_path):
    csv = write_csv(tmp_path / "list.csv", "video_name,tag,split\na.mp4,a,train\nb.mp4,b,validation\n")
    with pytest.raises(DatasetError, match=r"line 3 \('b\.mp4'\) has split 'validation'; use one of train, val, test"):
        index_dataset(csv=csv)


def test_csv_duplicate_video_name_is_refused(tmp_path):
    csv = write_csv(tmp_path / "list.csv", "video_name,tag\na.mp4,a\nb.mp4,b\n./a.mp4,b\n")
    with pytest.raises(DatasetError, match=r"line 4 lists '\./a\.mp4' again \(first on line 2\); remove the duplicate"):
        index_dataset(csv=csv)


def test_csv_missing_file_is_refused(tmp_path):
    with pytest.raises(DatasetError, match=r"CSV file '.*nope\.csv' does not exist; pass --csv FILE .*video_name,tag"):
        index_dataset(csv=tmp_path / "nope.csv")


def test_csv_that_is_a_folder_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="is not a file; pass --csv FILE"):
        index_dataset(csv=tmp_path)


def test_csv_missing_columns_is_refused(tmp_path):
    csv = write_csv(tmp_path / "list.csv", "file,label\na.mp4,a\n")
    with pytest.raises(
        DatasetError, match=r"lacks column\(s\) video_name, tag \(found: file, label\); its header must"
    ):
        index_dataset(csv=csv)


def test_csv_empty_file_is_refused(tmp_path):
    csv = write_csv(tmp_path / "list.csv", "")
    with pytest.raises(DatasetError, match="is empty; write a header line video_name,tag"):
        index_dataset(csv=csv)


def test_csv_header_without_rows_is_refused(tmp_path):
    csv = write_csv(tmp_path / "list.csv", "video_name,tag\n")
    with pytest.raises(DatasetError, match="has a header but no rows"):
        index_dataset(csv=csv)


def test_csv_unreadable_file_is_refused(tmp_path):
    csv = tmp_path / "list.csv"
    csv.write_bytes(b"video_name,tag\n\xff\xfe\xfa.mp4,a\n")
    with pytest.raises(DatasetError, match="cannot be read .*save it as UTF-8 CSV"):
        index_dataset(csv=csv)


def test_csv_empty_tag_is_refused(tmp_path):
    csv = write_csv(tmp_path / "list.csv", "video_name,tag\na.mp4,a\nb.mp4,\n")
    with pytest.raises(DatasetError, match=r"line 3 \('b\.mp4'\) has an empty tag"):
        index_dataset(csv=csv)


def test_csv_with_one_class_is_refused(tmp_path):
    csv = write_csv(tmp_path / "list.csv", "video_name,tag\na.mp4,only\nb.mp4,only\n")
    with pytest.raises(DatasetError, match="needs at least two classes, found only 'only'"):
        index_dataset(csv=csv)


# ------------------------------------------------------------------------------------------------
# ucf101


@pytest.mark.parametrize(
    ("lists_dir", "video_dir"),
    [(".", "."), ("ucfTrainTestlist", "."), ("ucfTrainTestlist", "UCF-101"), (".", "UCF101")],
)
def test_ucf101_layout_reads_lists_and_finds_video_root(tmp_path, lists_dir, video_dir):
    ucf_tree(tmp_path, lists_dir=lists_dir, video_dir=video_dir)
    ds = index_dataset(tmp_path)
    assert ds.layout == "ucf101"
    assert ds.root == (tmp_path / video_dir).resolve()
    assert ds.class_names == ("ApplyEyeMakeup", "Basketball")
    assert len(ds.records) == 24
    assert all(r.path == ds.root / r.video and r.path.is_file() for r in ds.records)
    assert ds.records[0].video == "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi"
    assert {r.label for r in ds.records if r.video.startswith("Basketball/")} == {"Basketball"}
    test_videos = {r.video for r in ds.records if r.split == "test"}
    assert test_videos == {r.video for r in ds.records if "_g01_" in r.video}


def test_ucf101_val_split_holds_out_whole_groups(tmp_path):
    ucf_tree(tmp_path)
    ds = index_dataset(tmp_path, val_fraction=0.34, seed=4)
    by_group: dict[tuple[str, str], set[str]] = {}
    for r in ds.records:
        group = r.video.split("_g")[1][:2]
        by_group.setdefault((r.label, group), set()).add(r.split)
    assert all(len(splits) == 1 for splits in by_group.values())
    # 3 train groups per class, round(3*0.34)=1 held out for val: 3 clips val, 6 train, 3 test
    expected = (("train", 6), ("val", 3), ("test", 3))
    assert ds.counts() == {s: {"ApplyEyeMakeup": n, "Basketball": n} for s, n in expected}


def test_ucf101_val_groups_change_with_seed_and_ignore_test_fraction(tmp_path):
    ucf_tree(tmp_path)
    seen = set()
    for seed in range(6):
        ds = index_dataset(tmp_path, val_fraction=0.34, test_fraction=0.5, seed=seed)
        assert ds.counts()["test"] == {"ApplyEyeMakeup": 3, "Basketball": 3}
        seen.add(frozenset(r.video for r in ds.records if r.split == "val"))
    assert len(seen) > 1


def test_ucf101_other_fold_uses_its_own_lists(tmp_path):
    ucf_tree(tmp_path, folds=(1, 2))
    (tmp_path / "trainlist02.txt").write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g03_c01.avi 1\nBasketball/v_Basketball_g03_c01.avi 2\n"
    )
    (tmp_path / "testlist02.txt").write_text("Basketball/v_Basketball_g02_c01.avi\n")
    ds = index_dataset(tmp_path, fold=2)
    assert [(r.video, r.split) for r in ds.records] == [
        ("ApplyEyeMakeup/v_ApplyEyeMakeup_g03_c01.avi", "train"),
        ("Basketball/v_Basketball_g02_c01.avi", "test"),
        ("Basketball/v_Basketball_g03_c01.avi", "train"),
    ]


def test_ucf101_missing_fold_lists_are_refused(tmp_path):
    ucf_tree(tmp_path)
    with pytest.raises(
        DatasetError, match=r"trainlist03\.txt, testlist03\.txt for fold 3 not found .*pick another --fold"
    ):
        index_dataset(tmp_path, fold=3)


def test_ucf101_missing_videos_are_refused(tmp_path):
    ucf_tree(tmp_path, lists_dir="ucfTrainTestlist", video_dir="elsewhere")
    with pytest.raises(DatasetError, match=r"None of the 24 clips .* exist under .*extract UCF101\.rar"):
        index_dataset(tmp_path)


def test_ucf101_class_number_disagreeing_with_classind_is_refused(tmp_path):
    ucf_tree(tmp_path)
    (tmp_path / "trainlist01.txt").write_text("Basketball/v_Basketball_g02_c01.avi 1\n")
    with pytest.raises(DatasetError, match="class number '1' for 'Basketball', but classInd.txt disagrees"):
        index_dataset(tmp_path)


def test_ucf101_clip_in_both_lists_is_refused(tmp_path):
    ucf_tree(tmp_path)
    (tmp_path / "testlist01.txt").write_text("Basketball/v_Basketball_g02_c01.avi\n")
    with pytest.raises(DatasetError, match="lists 'Basketball/v_Basketball_g02_c01.avi' twice"):
        index_dataset(tmp_path)


@pytest.mark.parametrize("fold", [0, 4, -1, 1.5, "1", True])
def test_bad_fold_is_refused(tmp_path, fold):
    ucf_tree(tmp_path)
    with pytest.raises(DatasetError, match=r"fold must be 1, 2 or 3, got .*; pass --fold 1, 2 or 3"):
        index_dataset(tmp_path, fold=fold)


# ------------------------------------------------------------------------------------------------
# detection order and folder errors


def test_csv_argument_wins_over_data_folder(tmp_path):
    ucf_tree(tmp_path / "ucf")
    csv = write_csv(tmp_path / "list.csv", "video_name,tag\na.mp4,a\nb.mp4,b\n")
    assert index_dataset(tmp_path / "ucf", csv=csv).layout == "csv"
    assert index_dataset(None, csv=csv).layout == "csv"


def test_ucf101_wins_over_split_folders(tmp_path):
    ucf_tree(tmp_path)
    touch(tmp_path, "train/x/1.mp4", "train/y/2.mp4")
    assert index_dataset(tmp_path).layout == "ucf101"


def test_missing_data_folder_says_how_to_get_one(tmp_path):
    missing = tmp_path / "nothing"
    with pytest.raises(DatasetError) as info:
        index_dataset(missing)
    assert str(info.value) == (
        f"Data folder '{missing}' does not exist; pass --data DIR or run `featpipe sample-data` "
        "to create the sample dataset."
    )
    assert isinstance(info.value, FeatpipeError)


def test_data_path_that_is_a_file_is_refused(tmp_path):
    touch(tmp_path, "clip.mp4")
    with pytest.raises(DatasetError, match="is a file, not a folder; pass --data DIR"):
        index_dataset(tmp_path / "clip.mp4")
    write_csv(tmp_path / "list.csv", "video_name,tag\n")
    with pytest.raises(DatasetError, match=r"is a file, not a folder; pass it as --csv .*list\.csv"):
        index_dataset(tmp_path / "list.csv")


def test_no_data_and_no_csv_is_refused():
    with pytest.raises(DatasetError, match="No dataset given; pass --data DIR"):
        index_dataset(None)


def test_folder_without_videos_lists_accepted_extensions(tmp_path):
    touch(tmp_path, "a/readme.txt", "b/.hidden.mp4")
    with pytest.raises(
        DatasetError, match=r"No video files found in .*accepted extensions: \.avi, \.m4v, \.mkv, \.mov, \.mp4"
    ):
        index_dataset(tmp_path)


def test_empty_split_folders_are_refused(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val").mkdir()
    with pytest.raises(DatasetError, match=r"No video files found .*DIR/\{train,val,test\}/<class>/"):
        index_dataset(tmp_path)


def test_single_class_folder_is_refused(tmp_path):
    class_tree(tmp_path, {"lonely": 4})
    with pytest.raises(
        DatasetError, match="needs at least two classes, found only 'lonely'; add clips of another class"
    ):
        index_dataset(tmp_path)


def test_single_class_in_split_folders_is_refused(tmp_path):
    touch(tmp_path, "train/a/1.mp4", "test/a/2.mp4")
    with pytest.raises(DatasetError, match="found only 'a'"):
        index_dataset(tmp_path)


def test_clips_loose_in_the_data_folder_are_refused(tmp_path):
    touch(tmp_path, "a/1.mp4", "b/2.mp4", "stray.mp4")
    with pytest.raises(DatasetError, match=r"'stray\.mp4'.*not inside a class folder; move it into DIR/<class>/"):
        index_dataset(tmp_path)


@pytest.mark.parametrize(
    ("val", "test", "message"),
    [
        (-0.1, 0.1, "val_fraction must be at least 0"),
        (0.1, -0.5, "test_fraction must be at least 0"),
        (0.5, 0.5, r"val_fraction \+ test_fraction must be below 1"),
        (0.9, 0.2, r"val_fraction \+ test_fraction must be below 1"),
        (float("nan"), 0.1, "val_fraction must be a number between 0 and 1"),
        ("0.1", 0.1, "val_fraction must be a number between 0 and 1"),
    ],
)
def test_bad_fractions_are_refused(tmp_path, val, test, message):
    class_tree(tmp_path, {"a": 3, "b": 3})
    with pytest.raises(DatasetError, match=message):
        index_dataset(tmp_path, val_fraction=val, test_fraction=test)


def test_negative_seed_is_refused(tmp_path):
    class_tree(tmp_path, {"a": 3, "b": 3})
    with pytest.raises(DatasetError, match="seed must be a non-negative integer, got -1"):
        index_dataset(tmp_path, seed=-1)
