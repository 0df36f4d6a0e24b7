"""Ctrl-C and SIGTERM that are never lost.

Python raises the KeyboardInterrupt of a signal in whatever code runs when the handler runs. When
that is a garbage-collector callback (JAX registers one), a weakref callback (a ``WeakKeyDictionary``
removing a key) or a ``__del__``, Python prints "Exception ignored in ..." and goes on: the interrupt is
lost, and a training run asked to stop keeps going. So the CLI's handler:

* records every interrupt until it is handled, and long loops call :func:`raise_pending` where raising is
  safe, for any place that swallowed it;
* inside :func:`recording` (and :func:`deferred`, around ``model.fit``) only records it and never raises:
  an exception raised while TensorFlow's C++ calls back into Python surfaced as ``SystemError: ... bad
  argument to internal function``, one raised inside a checkpoint's write left half a file, and one raised
  in a weakref callback at an epoch's end was dropped. Training checks at known-safe points (after every
  batch, at the end of every epoch once its row and checkpoint are written, and when ``fit`` returns);
* outside those blocks, landing inside a gc callback, it does not raise there: the signal is sent again
  a moment later;
* the CLI records only, around each command, which raises where a signal lands (:func:`raising`), so one
  that arrives as a command ends is reported, not raised inside the CLI's own machinery;
* at the end of the process (:func:`exit_status`, then an exit hook) an interrupt that arrived after the
  command had done its work is still reported, with exit status 130 or 143, never dropped and never left
  to kill the interpreter silently while it shuts down.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager

from featpipe.errors import Interrupted, Terminated

_pending: list[KeyboardInterrupt] = []
_deferring = 0
_hooked = False
_exit_code = None  # what exit_status decided

LATE = "interrupted: the command had already finished its work; what it wrote is complete."


def _in_gc_callback(frame) -> bool:
    codes = {getattr(callback, "__code__", None) for callback in gc.callbacks} - {None}
    while codes and frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


def _on_signal(signum, frame):
    exc = Terminated() if signum == signal.SIGTERM else Interrupted()
    if _deferring:  # only record: the code inside checks at its safe points
        _pending.append(exc)
        return
    if _in_gc_callback(frame):  # an exception raised here would be printed and dropped: ask again shortly
        threading.Timer(0.02, os.kill, (os.getpid(), signum)).start()
        return
    _pending.append(exc)
    raise exc


def install() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt / :class:`Terminated`, and are remembered until handled."""
    global _hooked
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    if not _hooked:  # registered first, so it runs after every other exit hook
        atexit.register(_at_exit)
        _hooked = True


def status(exc: BaseException) -> int:
    """The exit status of an interrupt: 143 for SIGTERM, 130 for Ctrl-C."""
    return 143 if isinstance(exc, Terminated) else 130


def pending() -> KeyboardInterrupt | None:
    """The interrupt a signal asked for that has not been handled yet, if any (it stays pending)."""
    return _pending[0] if _pending else None


def take() -> KeyboardInterrupt | None:
    """The interrupt a signal asked for, if any, now handled (the caller acts on it)."""
    exc = pending()
    _pending.clear()
    return exc


def raise_pending() -> None:
    """Raise the interrupt a signal asked for, if it has not been handled yet (e.g. it was swallowed)."""
    exc = take()
    if exc is not None:
        raise exc


def handled() -> None:
    """The interrupt has been caught and acted on: forget it."""
    _pending.clear()


@contextmanager
def recording():
    """Inside, a signal is only recorded, never raised where it lands; the code inside asks :func:`take` or
    :func:`raise_pending` where acting on it is safe. Leaving the block raises nothing: it stays pending."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1


@contextmanager
def raising():
    """Inside, a signal raises where it lands again (work with no safe points of its own, inside a
    :func:`recording` block: the CLI runs each command so, and ``train`` its preparation); entering from a
    recording block raises an interrupt recorded there."""
    global _deferring
    saved, _deferring = _deferring, 0
    try:
        if saved:
            raise_pending()
        yield
    finally:
        _deferring = saved


@contextmanager
def deferred():
    """:func:`recording`, and leaving the block normally raises an interrupt that is still pending (around
    ``model.fit``: a signal recorded during it stops the run even when the last epoch had ended)."""
    with recording():
        yield
    raise_pending()


def exit_status(code):
    """The process's exit status, given the command's ``code``: a signal recorded but not yet acted on (it
    arrived after the command had done its work) makes it 130 or 143, with a sentence. From here on a signal
    is only recorded; the exit hook reports one that arrives later."""
    global _deferring, _exit_code
    _deferring += 1  # never undone: the process is ending
    exc = take()
    if exc is not None and code not in (130, 143):
        _say(LATE)
        code = status(exc)
    _exit_code = code
    return code


def _say(line: str | None) -> None:
    try:
        sys.stdout.flush()
        if line is not None:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed or broken stderr: the exit status still tells
        pass


def _at_exit() -> None:
    """The last of featpipe's exit hooks. After the exit hooks Python tears down TensorFlow and the other
    modules (2-3 s), resets the signal handlers to the default, and a signal then kills the interpreter
    without a word: a SIGTERM that came right after a run was written whole ended the process as -15. So the
    CLI process ends here: everything it writes is written whole and closed by now, the streams are flushed,
    and it exits with the status the command decided, or 130/143 with a sentence if a signal came after."""
    if signal.getsignal(signal.SIGINT) is not _on_signal:  # not ours (e.g. a test restored its own)
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if _exit_code is None:  # not the CLI's process (exit_status was never called): leave the ending to Python
        return
    code = _as_status(_exit_code)
    exc = take()
    if exc is not None and code not in (130, 143):
        _say(LATE)
        code = status(exc)
    logging.shutdown()
    _say(None)
    os._exit(code)


def _as_status(code) -> int:
    """What ``sys.exit(code)`` would exit with (None: 0; a message: 1, printed)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    _say(str(code))
    return 1
