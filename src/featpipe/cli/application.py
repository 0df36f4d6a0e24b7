"""The typer app: the only place where a FeatpipeError becomes a message and an exit status.

Exit statuses:
  0 success, 1 the run finished but data failed (no usable clip, or --strict with failures),
  2 a user mistake (bad option, missing folder, unknown backbone, mismatched cache ...),
  130 interrupted by Ctrl-C, 143 stopped by SIGTERM (finished work is kept either way).

The commands live one group per module (data, extract, train, runs); each parses its options and
calls one library function. They are registered here, each wrapped in the error handling below.
"""

from __future__ import annotations

import functools
import sys
from typing import Annotated, Optional

import typer

from featpipe import __version__
from featpipe.cli.data import sample_data_cmd
from featpipe.cli.extract import extract_cmd, info_cmd, merge_cmd
from featpipe.cli.runs import evaluate_cmd, predict_cmd, report_cmd
from featpipe.cli.train import train_cmd, tune_cmd
from featpipe.cli.zeroshot import zero_shot_cmd
from featpipe.errors import FeatpipeError, OptionError, Terminated
from featpipe.runtime import signals
from featpipe.runtime.keras_import import set_verbose

app = typer.Typer(
    name="featpipe",
    help="Video classification in two stages: frozen ImageNet CNN features into an HDF5 cache, then fast sequence "
    "models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


INTERRUPTED = "interrupted: finished clips are saved; run the same command again to resume."
TRAIN_INTERRUPTED = "interrupted: training stopped before its first epoch finished; no run directory was written."
TUNE_INTERRUPTED = "interrupted: finished trials are kept in study.db; run the same command again to resume."
READ_INTERRUPTED = "interrupted: nothing was written."


def _handles_errors(fn=None, *, interrupted: str = INTERRUPTED, flags: dict[str, str] | None = None):
    """Turn FeatpipeError into one sentence on stderr and its exit status; Ctrl-C into 130, SIGTERM into 143.

    ``interrupted`` is what the command says when stopped (extract: finished clips are kept; train: ...).
    An OptionError names the flag (``--batch-size``), not the Python parameter; ``flags`` maps a
    parameter whose flag is spelled otherwise (``cache_dir`` -> ``--cache``).
    """
    if fn is None:
        return functools.partial(_handles_errors, interrupted=interrupted, flags=flags)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with signals.raising():  # a signal raises where it lands; around this, main() only records it
                return fn(*args, **kwargs)
        except OptionError as exc:
            typer.secho(f"error: {exc.flag_message(flags)}", err=True, fg=typer.colors.RED)
            raise typer.Exit(exc.exit_code) from None
        except FeatpipeError as exc:
            typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated) through featpipe.runtime.signals
            typer.secho(interrupted, err=True)
            raise typer.Exit(143 if isinstance(exc, Terminated) else 130) from None

    return wrapper


def _version(value: bool):
    if value:
        typer.echo(f"featpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            help="Show TensorFlow's own start-up and C++ log lines (hidden by default; or set FEATPIPE_VERBOSE=1).",
        ),
    ] = False,
):
    """featpipe: extract once, train many times, predict with exactly the same preprocessing."""
    set_verbose(verbose)  # before any command imports Keras


# (name, function, what it says when interrupted), in the order --help lists them
COMMANDS = (
    ("sample-data", sample_data_cmd, INTERRUPTED),
    ("extract", extract_cmd, INTERRUPTED),
    ("train", train_cmd, TRAIN_INTERRUPTED),
    ("tune", tune_cmd, TUNE_INTERRUPTED),
    ("evaluate", evaluate_cmd, READ_INTERRUPTED),
    ("report", report_cmd, READ_INTERRUPTED),
    ("predict", predict_cmd, READ_INTERRUPTED),
    ("zero-shot", zero_shot_cmd, READ_INTERRUPTED),
    ("merge", merge_cmd, INTERRUPTED),
    ("info", info_cmd, INTERRUPTED),
)


def _register() -> None:
    """Each command on the app, wrapped in the one error handling of the CLI."""
    for name, command, interrupted in COMMANDS:
        app.command(name)(_handles_errors(command, interrupted=interrupted))


_register()


def main() -> None:
    # batch schedulers and container runtimes stop jobs with SIGTERM: treat it as Ctrl-C (finished work is kept);
    # both are remembered until handled, so one swallowed by a garbage-collector callback still stops training
    signals.install()
    try:
        with signals.recording():  # outside a command's own work a signal is recorded, and reported below
            app()  # always ends in SystemExit (typer's standalone mode)
        code = 0
    except SystemExit as exc:
        code = exc.code
    # a signal that arrived after the command had acted (e.g. after a run was written whole) still exits 130/143
    sys.exit(signals.exit_status(code))


if __name__ == "__main__":
    sys.exit(main())
