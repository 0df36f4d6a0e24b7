"""Ctrl-C and SIGTERM that are never lost.

Python raises the KeyboardInterrupt of a signal in whatever code runs when the handler runs. When
that is a garbage-collector callback (JAX and TensorFlow register some) or a ``__del__``, Python
prints "Exception ignored in ..." and goes on: the interrupt is lost, and a training run asked to
stop keeps going. So the CLI's handler also records the interrupt, and long loops call
:func:`raise_pending` at points where raising is safe (``train`` and ``tune`` after every batch):
an interrupt that was swallowed is raised there again.
"""

from __future__ import annotations

import signal

from featpipe.errors import Terminated

_pending: list[KeyboardInterrupt] = []


def _on_signal(signum, frame):
    exc = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
    _pending.append(exc)
    raise exc


def install() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt / :class:`Terminated`, and are remembered until handled."""
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)


def raise_pending() -> None:
    """Raise the interrupt a signal asked for, if it has not been handled yet (e.g. it was swallowed)."""
    if _pending:
        exc = _pending[0]
        _pending.clear()
        raise exc


def handled() -> None:
    """The interrupt has been caught and acted on: forget it."""
    _pending.clear()
