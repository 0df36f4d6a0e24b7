"""What the command modules share: choices as str Enums, help texts, defaults read from the library.

A default is written once, in the options dataclass (or the function) that takes it:
``defaults(ExtractOptions)["frames"]`` is what ``--frames`` shows and passes when not given.
"""

from __future__ import annotations

import dataclasses
import inspect
from enum import Enum
from pathlib import Path

import typer

from featpipe.backbones.registry import REGISTRY
from featpipe.errors import OptionError
from featpipe.names import (
    CLASS_WEIGHTS,
    CV_MODES,
    DECODERS,
    DIFFICULTIES,
    DTYPES,
    ENGINES,
    HEAD_NAMES,
    PRECISIONS,
    SAMPLING,
)


def choices(name: str, values) -> type[Enum]:
    """A str Enum of the library's own names, so --help and the error message list exactly what the library takes."""
    return Enum(name, {value.replace("-", "_"): value for value in values}, type=str)


Sampling = choices("Sampling", SAMPLING)
Decoder = choices("Decoder", DECODERS)
Precision = choices("Precision", PRECISIONS)
DType = choices("DType", DTYPES)
Engine = choices("Engine", ENGINES)
Difficulty = choices("Difficulty", DIFFICULTIES)
Head = choices("Head", HEAD_NAMES)
ClassWeight = choices("ClassWeight", CLASS_WEIGHTS)
CV = choices("CV", CV_MODES)


BACKBONE_HELP = (
    f"Frozen ImageNet CNN: {', '.join(n for n, b in REGISTRY.items() if not b.raw and not b.extra)}; "
    f"or {', '.join(n for n, b in REGISTRY.items() if b.raw)} (the frames themselves, for cnn-lstm); "
    f'or a foundation model (needs pip install "featpipe[hub]"): '
    f"{', '.join(n for n, b in REGISTRY.items() if b.extra)}, or hub:PRESET (a keras-hub preset or folder)."
)
DECODER_HELP = (
    "auto/pyav: seek to the frames kept (clips that cannot be sought reliably are read in order); "
    "opencv: read every frame in order. All give the same frames."
)
PRECISION_HELP = "Backbone compute precision; mixed_* are for GPUs/TPUs (features are stored as --dtype either way)."
BATCH_HELP = "Frames per backbone forward pass [default: 32 on CPU; on a GPU, sized from its free memory]."
WORKERS_HELP = "Decoding threads [default: one per CPU core, at most 32]."
CACHE_HELP = "Cache file [default: the single .h5 in --cache-dir]."


def default_of(owner, name: str):
    """The default of ``name`` in an options dataclass (or a function's parameter), as the CLI takes it.

    A tuple (``TuneOptions.heads``) comes back comma-separated, as the option is typed.
    """
    if dataclasses.is_dataclass(owner):
        value = owner.__dataclass_fields__[name].default
    else:
        value = inspect.signature(owner).parameters[name].default
    if value is dataclasses.MISSING or value is inspect.Parameter.empty:
        raise TypeError(f"{getattr(owner, '__name__', owner)}.{name} has no default")
    return ",".join(value) if isinstance(value, tuple) else value


def defaults(owner) -> dict:
    """Every default of an options dataclass (or a function), by name, as :func:`default_of` gives each."""
    names = (
        [f.name for f in dataclasses.fields(owner)]
        if dataclasses.is_dataclass(owner)
        else list(inspect.signature(owner).parameters)
    )
    found = {}
    for name in names:
        try:
            found[name] = default_of(owner, name)
        except TypeError:  # a field without a default: the CLI must ask for it
            pass
    return found


def plain(params: dict) -> dict:
    """A command's parameters as the library takes them: each choice (a str Enum) as its plain string."""
    return {k: v.value if isinstance(v, Enum) else v for k, v in params.items()}


def renamed(params: dict, old: str, new: str, old_flag: str, new_flag: str, command: str, note: bool = True) -> dict:
    """Move a hidden old spelling's value to its new name, with a one-line deprecation note on stderr."""
    value = params.pop(old)
    if value is not None:
        if note:
            typer.secho(f"note: {old_flag} is deprecated for {command}; use {new_flag}", err=True)
        params[new] = value
    return params


def one_cache(argument: Path | None, option: Path | None, metavar: str = "CACHE") -> Path | None:
    """The cache file named as the positional argument or as ``--cache`` (the same file may be given both ways)."""
    if argument is not None and option is not None and Path(argument).resolve() != Path(option).resolve():
        raise OptionError(
            "cache",
            f"and {metavar} name different files ('{option}' and '{argument}'); give the cache file once.",
        )
    return argument if argument is not None else option
