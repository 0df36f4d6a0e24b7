"""The command line: the typer ``app`` and ``main`` (the ``featpipe`` entry point), from ``application``.

``application`` holds the app and the one place where errors become exit statuses; each group
of commands has its own module (``data``, ``extract``, ``train``, ``runs``) and shared option
pieces live in ``params``. No submodule is named ``app`` or ``main``: it would shadow the
re-exported objects of the same names.
"""

from featpipe.cli.application import app, main

__all__ = ["app", "main"]
