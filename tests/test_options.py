"""Option values as people pass them to the Python API: one path, a comma-separated list."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import featpipe
from featpipe.errors import OptionError
from featpipe.extraction.options import ExtractOptions
from featpipe.runs.predict import PredictOptions
from featpipe.training.options import TrainOptions
from featpipe.training.search import TuneOptions

OPTIONS = (ExtractOptions, TrainOptions, TuneOptions, PredictOptions)
# every list-valued option field: (a comma-separated string as the CLI takes it, what it means)
LIST_FIELDS = {
    ("TuneOptions", "heads"): (" gru, lstm,,segments ", ("gru", "lstm", "segments")),
}


def _list_fields():
    for cls in OPTIONS:
        for f in dataclasses.fields(cls):
            if str(f.type).startswith(("tuple", "list", "Sequence")):
                yield cls, f.name


def test_every_list_valued_option_takes_a_comma_separated_string_like_the_cli():
    found = {(cls.__name__, name) for cls, name in _list_fields()}
    assert found == set(LIST_FIELDS), "a new list-valued option: add an example to LIST_FIELDS"
    for cls, name in _list_fields():
        text, meant = LIST_FIELDS[(cls.__name__, name)]
        assert getattr(cls(**{name: text}), name) == meant  # not its letters: 'g', 'r', 'u', ...
        assert getattr(cls(**{name: list(meant)}), name) == meant
        assert getattr(cls(**{name: [text]}), name) == meant


def test_a_list_option_of_something_else_is_refused_naming_it():
    with pytest.raises(OptionError, match=r"^heads must be a comma-separated string or a list of names, got 3 \(int\)"):
        TuneOptions(heads=["gru", 3])
    with pytest.raises(OptionError, match=r"^heads must be a comma-separated string or a list of names, got 7"):
        TuneOptions(heads=7)
    with pytest.raises(OptionError, match=r"^heads must name at least one head"):
        TuneOptions(heads=" , ")


def test_one_path_is_one_path_never_its_letters(tmp_path):
    from featpipe.options import as_paths  # the helper predict's clips and merge's shards go through

    assert as_paths("clips", "a.mp4") == [Path("a.mp4")]
    assert as_paths("clips", Path("dir/a.mp4")) == [Path("dir/a.mp4")]
    assert as_paths("clips", b"a.mp4") == [Path("a.mp4")]
    assert as_paths("clips", ("a.mp4", Path("b.mp4"))) == [Path("a.mp4"), Path("b.mp4")]
    with pytest.raises(OptionError, match=r"^clips holds an empty path"):
        as_paths("clips", "")  # Path("") is the current folder
    with pytest.raises(OptionError, match=r"^clips must be a video file or a folder or a list of them, got 3"):
        as_paths("clips", 3, "a video file or a folder")
    with pytest.raises(OptionError, match=r"got None among them"):
        as_paths("clips", ["a.mp4", None])


def test_merge_takes_one_shard_path_as_one_file(tmp_path):
    shard = tmp_path / "c.shard-1-of-2.h5"
    for given in (str(shard), shard):
        with pytest.raises(featpipe.FeatpipeError, match=f"'{shard}' does not exist"):
            featpipe.merge(given, output=tmp_path / "c.h5")
