"""The README's option tables say exactly what `featpipe COMMAND --help` offers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.main import get_command

from featpipe.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
FLAG = re.compile(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*(?:/--[a-z0-9-]+)?|-[a-z])(?![\w-])")


def readme_flags(command: str) -> set[str]:
    """Flags named in the first column of the option tables under ``### `featpipe COMMAND ...` ``."""
    text = README.read_text()
    start = re.search(rf"^### `featpipe {re.escape(command)}\b.*$", text, re.M)
    if start is None:
        return set()
    end = re.search(r"^#{2,3} ", text[start.end():], re.M)
    section = text[start.end(): start.end() + end.start() if end else len(text)]
    flags: set[str] = set()
    in_table = False
    for line in section.splitlines():
        if not line.startswith("|"):
            in_table = False
            continue
        first = line.split("|")[1].strip()
        if first.lower().startswith("option"):
            in_table = True
        elif in_table and not set(first) <= set("-: "):
            for flag in FLAG.findall(first):
                flags.update(flag.split("/"))
    return flags


def cli_flags(command: str) -> set[str]:
    params = get_command(app).commands[command].params
    return {o for p in params if not getattr(p, "hidden", False) and p.param_type_name == "option"
            for o in (*p.opts, *p.secondary_opts)} - {"--help"}


COMMANDS = [c for c in get_command(app).commands if readme_flags(c)] if README.is_file() else []


def test_the_main_commands_have_option_tables():
    assert {"extract", "train"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_option_table_matches_help(command):
    documented, offered = readme_flags(command), cli_flags(command)
    assert documented == offered, (f"README table for `featpipe {command}`: missing {sorted(offered - documented)}, "
                                   f"not offered {sorted(documented - offered)}")
