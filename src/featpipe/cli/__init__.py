"""The typer app: the only place that turns a FeatpipeError into a message and an exit status."""

from featpipe.cli.commands import app, main

__all__ = ["app", "main"]
