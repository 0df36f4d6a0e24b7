"""Ctrl-C and SIGTERM that are never lost.

Python raises the KeyboardInterrupt of a signal in whatever code runs when the handler runs. When
that is a garbage-collector callback (JAX registers one) or a ``__del__``, Python prints "Exception
ignored in ..." with a traceback and goes on: the interrupt is lost, and a training run asked to
stop keeps going. So the CLI's handler does two things:

* landing inside a gc callback, it does not raise there: the signal is sent again a moment later;
* it records the interrupt until it is handled, and long loops call :func:`raise_pending` where
  raising is safe (``train`` and ``tune`` after every batch), for any other place that swallows it;
* inside :func:`deferred` (around ``model.fit``) it only records: an exception raised while TensorFlow's
  C++ calls back into Python surfaced as ``SystemError: ... bad argument to internal function``, and one
  raised inside a checkpoint's write left half a file. The next batch's :func:`raise_pending` raises it.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
from contextlib import contextmanager

from featpipe.errors import Interrupted, Terminated

_pending: list[KeyboardInterrupt] = []
_deferring = 0


def _in_gc_callback(frame) -> bool:
    codes = {getattr(callback, "__code__", None) for callback in gc.callbacks} - {None}
    while codes and frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


def _on_signal(signum, frame):
    if _in_gc_callback(frame):  # an exception raised here would be printed and dropped: ask again shortly
        threading.Timer(0.02, os.kill, (os.getpid(), signum)).start()
        return
    exc = Terminated() if signum == signal.SIGTERM else Interrupted()
    _pending.append(exc)
    if _deferring:
        return
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


@contextmanager
def deferred():
    """Inside, a signal is only recorded: the code inside calls :func:`raise_pending` where raising is safe
    (a Keras callback after every batch), and leaving the block normally raises one that is still pending."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    raise_pending()
