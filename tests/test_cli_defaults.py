"""Each option's default is written once: every CLI option named like a library field has that field's default."""

from __future__ import annotations

import dataclasses
import inspect
from enum import Enum
from pathlib import Path

import pytest
from typer.main import get_command

from featpipe.cli import app
from featpipe.extraction.extract import ExtractOptions
from featpipe.runs.evaluate import evaluate
from featpipe.runs.predict import PredictOptions
from featpipe.runs.report import write_report
from featpipe.runs.zeroshot import zero_shot, zero_shot_cache
from featpipe.training.train import TrainOptions
from featpipe.training.tune import TuneOptions

COMMANDS = get_command(app).commands


def _sample_data_defaults() -> dict:
    from featpipe.video.sample_data import write_sample_data  # OpenCV: imported by this test only

    return _function_defaults(write_sample_data)


def _function_defaults(fn) -> dict:
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def _dataclass_defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


# command -> where the library writes its defaults; every command is listed (a new one fails here first)
LIBRARY = {
    "sample-data": _sample_data_defaults,
    "extract": lambda: _dataclass_defaults(ExtractOptions),
    "train": lambda: _dataclass_defaults(TrainOptions),
    "tune": lambda: _dataclass_defaults(TuneOptions),
    "evaluate": lambda: _function_defaults(evaluate),
    "report": lambda: _function_defaults(write_report),
    "predict": lambda: _dataclass_defaults(PredictOptions),
    "merge": lambda: {},  # merge() and the CLI have no defaulted setting in common to compare
    "info": lambda: {},
    "zero-shot": lambda: {**_function_defaults(zero_shot), **_function_defaults(zero_shot_cache)},
}


def _as_typed(value):
    """A default as a user types it: a choice by its name, a path as text, a tuple comma-separated."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return ",".join(value)
    return value


def test_every_command_says_where_its_defaults_live():
    assert set(LIBRARY) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(LIBRARY))
def test_each_cli_default_is_the_librarys(command):
    library = LIBRARY[command]()
    params = [p for p in COMMANDS[command].params if p.name in library]
    wrong = [
        f"{p.opts[0]}: CLI {_as_typed(p.default)!r}, library {_as_typed(library[p.name])!r}"
        for p in params
        if _as_typed(p.default) != _as_typed(library[p.name])
    ]
    assert not wrong, f"`featpipe {command}` states other defaults than the library: {wrong}"
    if library:  # the names line up (a renamed field would silently drop out of the comparison)
        assert len(params) >= min(3, len(library)), [p.name for p in params]
