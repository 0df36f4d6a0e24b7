"""Checks for option values, shared by every options dataclass (CLI and Python API alike).

Each check raises :class:`featpipe.errors.OptionError` naming the *parameter* (``batch_size``);
the CLI re-renders that name as its flag (``--batch-size``), so a Python caller never reads
about flags it did not type and a shell user never reads about Python parameter names.
"""

from __future__ import annotations

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
