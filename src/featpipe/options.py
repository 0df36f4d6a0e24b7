"""Checks for option values, shared by every options dataclass (CLI and Python API alike).

Each check raises :class:`featpipe.errors.OptionError` naming the *parameter* (``batch_size``);
the CLI re-renders that name as its flag (``--batch-size``), so a Python caller never reads
about flags it did not type and a shell user never reads about Python parameter names.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from pathlib import Path

from featpipe.errors import OptionError


def check_int(
    name: str, value, low: int | None = None, high: int | None = None, *, optional: bool = False, hint: str = ""
) -> None:
    """``value`` is an int within [low, high] (None allowed when ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise OptionError(name, f"must be a whole number, got {value!r}.")
    value = int(value)
    if low is not None and value < low or high is not None and value > high:
        if high is None:
            bound = f"at least {low}"
        elif low is None:
            bound = f"at most {high}"
        else:
            bound = f"between {low} and {high}"
        raise OptionError(name, f"must be {bound}, got {value}.{(' ' + hint) if hint else ''}")


def check_float(
    name: str,
    value,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
    hint: str = "",
) -> None:
    """``value`` is a finite number within the bounds (``*_open``: the bound itself is excluded)."""
    if value is None and optional:
        return
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise OptionError(name, f"must be a number, got {value!r}.") from None
    if isinstance(value, bool) or not math.isfinite(x):
        raise OptionError(name, f"must be a finite number, got {value!r}.")
    too_low = low is not None and (x <= low if low_open else x < low)
    too_high = high is not None and (x >= high if high_open else x > high)
    if too_low or too_high:
        parts = []
        if low is not None:
            parts.append(f"{'above' if low_open else 'at least'} {low:g}")
        if high is not None:
            parts.append(f"{'below' if high_open else 'at most'} {high:g}")
        raise OptionError(name, f"must be {' and '.join(parts)}, got {value!r}.{(' ' + hint) if hint else ''}")


def check_choice(name: str, value, choices, *, optional: bool = False) -> None:
    """``value`` is one of ``choices``."""
    if value is None and optional:
        return
    if value not in tuple(choices):
        raise OptionError(name, f"must be one of {', '.join(map(str, choices))}, got {value!r}.")


def check_dir_option(name: str, value, *, must_exist: bool = False, optional: bool = False) -> None:
    """``value`` names a folder (or a place a folder can be created), never an existing file."""
    if value is None and optional:
        return
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise OptionError(name, f"must be a folder, but '{path}' is a file.")
    if must_exist and not path.is_dir():
        raise OptionError(name, f"must be an existing folder; '{path}' does not exist.")


def check_file_option(name: str, value, *, must_exist: bool = False, optional: bool = False) -> None:
    """``value`` names a file (or a place a file can be written), never an existing folder."""
    if value is None and optional:
        return
    path = Path(value)
    if path.is_dir():
        raise OptionError(name, f"must be a file, but '{path}' is a folder.")
    if must_exist and not path.is_file():
        raise OptionError(name, f"must be an existing file; '{path}' does not exist.")


def check_writable_parent(name: str, path, what: str = "output") -> None:
    """The folder that will hold ``path`` exists (or can be created) and is writable."""
    parent = Path(path).parent if not Path(path).is_dir() else Path(path)
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise OptionError(
            name, f"names {what} '{path}', but '{probe}' is not writable; choose a folder you can write to."
        )


# --------------------------------------------------------------------------------------------
# paths and lists as people pass them

PathLike = (str, bytes, os.PathLike)


def as_paths(name: str, value, what: str = "a path") -> list[Path]:
    """One path (``str``, ``bytes``, ``Path``) or an iterable of them, as a list of Paths.

    A string is one path, never iterated letter by letter (where ``'.'`` and ``'/'`` would name
    whole folders); an empty string (which ``Path`` reads as the current folder) is refused.
    """
    if isinstance(value, PathLike):
        items = [value]
    else:
        try:
            items = list(value)
        except TypeError:
            raise OptionError(name, f"must be {what} or a list of them, got {value!r}.") from None
    paths = []
    for item in items:
        if not isinstance(item, PathLike):
            raise OptionError(name, f"must be {what} or a list of them, got {item!r} among them.")
        text = os.fsdecode(item)
        if not text.strip():
            raise OptionError(name, f"holds an empty path; give {what} (use '.' to mean the current folder).")
        paths.append(Path(text))
    return paths


def as_names(name: str, value) -> tuple[str, ...]:
    """A list-valued option as a tuple of names: a comma-separated string is split as the CLI does.

    ``"gru, lstm"``, ``["gru", "lstm"]`` and ``("gru,lstm",)`` all give ``("gru", "lstm")``;
    blanks around names and empty names are dropped. Anything but strings is refused by name.
    """
    if isinstance(value, str):
        items = [value]
    else:
        try:
            items = list(value)
        except TypeError:
            raise OptionError(name, f"must be a comma-separated string or a list of names, got {value!r}.") from None
    names = []
    for item in items:
        if not isinstance(item, str):
            raise OptionError(
                name, f"must be a comma-separated string or a list of names, got {item!r} ({type(item).__name__})."
            )
        names.extend(part.strip() for part in item.split(",") if part.strip())
    return tuple(names)


def split_list_options(options) -> None:
    """Every tuple- or list-valued field of an options dataclass, normalised by :func:`as_names`.

    Called first thing in each ``*Options.__post_init__``, so a field added later is covered
    too: ``TuneOptions(heads="gru,lstm")`` means ``("gru", "lstm")``, as ``--heads gru,lstm`` does.
    """
    for f in dataclasses.fields(options):
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if kind.startswith(("tuple", "list", "Sequence")) and getattr(options, f.name) is not None:
            object.__setattr__(options, f.name, as_names(f.name, getattr(options, f.name)))
