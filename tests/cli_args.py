"""The command lines the tests type, written once: run featpipe in-process or as `python -m featpipe`.

cli("info", cache)                                   # in-process (typer's runner), no traceback allowed
cli(*extract_args(data, out, *SMALL, quiet=True))    # extract --data DATA --output OUT --backbone vgg16 ...
subprocess.run(python_m("train", "--cache", cache))  # a fresh process, as a user runs it
"""

from __future__ import annotations

import sys

from typer.testing import CliRunner

from featpipe.cli import app

runner = CliRunner()

# the cheapest real extraction: vgg16 at 32 px, 8 frames, a deterministic random network
SMALL = ["--backbone", "vgg16", "--size", "32", "--frames", "8", "--weights", "none"]


def flags(*args, **options) -> list[str]:
    """A command line from arguments and options: ``flags("x", batch_size=4, quiet=True)`` is
    ``["x", "--batch-size", "4", "--quiet"]`` (a True option is a bare flag; False and None are left out)."""
    line = [str(a) for a in args]
    for name, value in options.items():
        if value is None or value is False:
            continue
        line.append("--" + name.replace("_", "-"))
        if value is not True:
            line.append(str(value))
    return line


def extract_args(data, out, *args, **options) -> list[str]:
    """``extract --data DATA --output OUT`` followed by ``args`` and ``options`` (see :func:`flags`)."""
    return ["extract", "--data", str(data), "--output", str(out), *flags(*args, **options)]


def cli(*args, **kwargs):
    """``featpipe ARGS`` in-process; a traceback in its output fails the test. ``kwargs`` go to the runner."""
    result = runner.invoke(app, [str(a) for a in args], **kwargs)
    assert "Traceback" not in result.output + (result.stderr or "")
    return result


def python_m(*args) -> list[str]:
    """``python -m featpipe ARGS`` as an argument list for subprocess."""
    return [sys.executable, "-m", "featpipe", *map(str, args)]
