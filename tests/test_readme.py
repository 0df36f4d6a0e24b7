"""The option tables of the command reference (docs/cli.md) say exactly what `featpipe COMMAND --help` offers.

With the same defaults, too. The README itself only links there; tests/test_docs.py checks those links.
"""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path

import pytest
from typer.main import get_command

from featpipe.cli.commands import app

CLI_DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
FLAG = re.compile(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*(?:/--[a-z0-9-]+)?|-[a-z])(?![\w-])")
ALL_COMMANDS = sorted(get_command(app).commands)


def readme_rows(command: str) -> list[tuple[list[str], str]]:
    """(flags, default cell) of each row of the option tables under ``## `featpipe COMMAND ...` `` in docs/cli.md.

    The section runs to the next heading of its level (its ``###`` subsections belong to it).
    """
    text = CLI_DOC.read_text()
    start = re.search(rf"^## `featpipe {re.escape(command)}\b.*$", text, re.M)
    if start is None:
        return []
    end = re.search(r"^#{1,2} ", text[start.end() :], re.M)
    section = text[start.end() : start.end() + end.start() if end else len(text)]
    rows: list[tuple[list[str], str]] = []
    in_table = False
    for line in section.splitlines():
        if not line.startswith("|"):
            in_table = False
            continue
        cells = [c.strip() for c in line.split("|")[1:-1]]
        first = cells[0]
        if first.lower().startswith("option"):
            in_table = True
        elif in_table and not set(first) <= set("-: "):
            flags = [f for flag in FLAG.findall(first) for f in flag.split("/")]
            rows.append((flags, cells[1] if len(cells) > 1 else ""))
    return rows


def readme_flags(command: str) -> set[str]:
    """Flags named in the first column of the command's option tables."""
    return {flag for flags, _ in readme_rows(command) for flag in flags}


def cli_options(command: str) -> list:
    params = get_command(app).commands[command].params
    return [
        p
        for p in params
        if not getattr(p, "hidden", False) and p.param_type_name == "option" and "--help" not in p.opts
    ]


def cli_flags(command: str) -> set[str]:
    return {o for p in cli_options(command) for o in (*p.opts, *p.secondary_opts)}


COMMANDS = [c for c in ALL_COMMANDS if readme_flags(c)]


def test_every_command_has_an_option_table():
    """A new command fails here until its docs/cli.md section (``## `featpipe NAME ...` ``) has an option table.

    Only a command without a visible option (none today) could have no table.
    """
    needed = {c for c in ALL_COMMANDS if cli_flags(c)}
    assert needed <= set(COMMANDS), f"no option table in docs/cli.md for {sorted(needed - set(COMMANDS))}"
    assert {"extract", "train", "merge", "predict"} <= set(COMMANDS)  # the discovery itself still works


@pytest.mark.parametrize("command", COMMANDS)
def test_option_table_matches_help(command):
    documented, offered = readme_flags(command), cli_flags(command)
    assert documented == offered, (
        f"docs/cli.md table for `featpipe {command}`: missing {sorted(offered - documented)}, "
        f"not offered {sorted(documented - offered)}"
    )


def _cell_parts(cell: str) -> list[str]:
    """A default cell split at its commas outside backticks: ``16, 6, 6`` -> 3 parts, `` `gru,lstm` `` -> 1."""
    parts = [""]
    for i, piece in enumerate(cell.split("`")):
        if i % 2:  # inside backticks
            parts[-1] += f"`{piece}`"
        else:
            first, *rest = piece.split(",")
            parts[-1] += first
            parts.extend(rest)
    return [part.strip() for part in parts] if cell.strip() else []


_LITERAL = re.compile(r"`([^`]+)`|(-?\d[\d.e+-]*)|(off)")


def _documented_default(cell: str):
    """The default a cell states as a plain literal (`gru`, 0.15, 3e-3, off), or None for prose ("the cache's")."""
    m = _LITERAL.fullmatch(cell)
    if m is None:
        return None
    text, number, off = m.groups()
    if off:
        return False
    if number:
        return float(number)
    return text


def _same_default(documented, default) -> bool:
    if isinstance(default, Enum):
        default = default.value
    if isinstance(documented, bool) or isinstance(default, bool):
        return documented is default
    if isinstance(documented, float):
        return isinstance(default, (int, float)) and float(default) == documented
    return str(default) == documented


@pytest.mark.parametrize("command", COMMANDS)
def test_documented_defaults_match_help(command):
    """Where a row gives its default as a literal (one per option: `16, 6, 6` for three options), the CLI has it.

    Prose defaults ("the cache's", "by size", "CPU cores (<= 32)") are not checked, nor any option
    whose CLI default is None: the library computes that default, and docs/cli.md describes it.
    """
    by_flag = {o: p for p in cli_options(command) for o in (*p.opts, *p.secondary_opts)}
    checked, wrong = 0, []
    for flags, cell in readme_rows(command):
        params = list({id(by_flag[f]): by_flag[f] for f in flags if f in by_flag}.values())
        parts = _cell_parts(cell)
        if not params or len(parts) != len(params):
            continue
        for param, part in zip(params, parts):
            documented = _documented_default(part)
            if documented is None or param.default is None:
                continue
            checked += 1
            if not _same_default(documented, param.default):
                wrong.append(f"{param.opts[0]}: docs/cli.md {part}, --help {param.default!r}")
    assert not wrong, f"docs/cli.md table for `featpipe {command}` states other defaults than the CLI: {wrong}"
    if any(isinstance(p.default, (int, float)) and not isinstance(p.default, bool) for p in cli_options(command)):
        assert checked, f"no default of `featpipe {command}` could be read from its table"
