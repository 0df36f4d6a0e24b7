"""Worker processes that never outlive the command that started them, and the lock of a shared folder.

`featpipe tune` runs its trials in processes started with multiprocessing's 'spawn'. Killed with
SIGKILL, a parent can run no cleanup, so each worker watches for itself:

* on Linux, ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills the worker when the thread that
  started it ends. Set in the worker, it comes too late if the parent died before it was set, so
  :func:`die_with_parent` then compares ``os.getppid()`` with the parent it was given;
* everywhere, a daemon thread polls ``os.getppid()`` and ends the worker when it changes (the
  worker was re-parented: its parent is gone), for systems without ``prctl``.

:class:`FolderLock` keeps a rerun from racing orphans: the command holds ``<name>.lock``
exclusively for its whole run (a second command is refused with a sentence), and each worker holds
``<name>.workers.lock`` shared until it exits, so a new command waits until every worker of a
killed one is gone before it touches what they wrote.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no folder lock (the parent watch still stops orphans)
    fcntl = None

from featpipe.errors import FolderBusy

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCH_SECONDS = 0.5  # how often a worker looks for its parent
ORPHAN_WAIT = 20.0  # seconds a new command waits for the workers of a killed one to stop

_held: list[int] = []  # the worker's shared lock: open (and held) until the process exits


def die_with_parent(parent: int) -> None:
    """In a worker: end this process as soon as ``parent`` (the pid that started it) is gone."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no libc or no prctl: the watch below does it
            pass
    if os.getppid() != parent:  # the parent died before PDEATHSIG was set: it will never fire
        os._exit(1)
    threading.Thread(target=_watch, args=(parent,), name="featpipe-parent-watch", daemon=True).start()


def _watch(parent: int) -> None:
    while True:
        time.sleep(WATCH_SECONDS)
        if os.getppid() != parent:  # re-parented: whoever started us is gone, and so is the search
            os._exit(1)


@contextmanager
def startup_without_sigint():
    """Around starting workers: Ctrl-C (SIGINT, sent to the whole foreground process group) is blocked, and
    the blocked mask is what a spawned interpreter starts with, so a worker cannot print a KeyboardInterrupt
    traceback while it is still importing; it ignores SIGINT from then on (:func:`ignore_sigint`), and the
    parent, which gets the same Ctrl-C once the block ends, stops its workers itself."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def ignore_sigint() -> None:
    """In a worker: Ctrl-C is the parent's to handle (it stops the workers with SIGTERM)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def hold_worker_lock(path: Path) -> None:
    """In a worker: hold ``path`` shared until this process ends (:class:`FolderLock` waits for it)."""
    if fcntl is None:
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    _held.append(fd)


class FolderLock:
    """Held by the command that works in ``folder`` (on ``<name>.lock``), for as long as the ``with`` lasts.

    Entering refuses (:class:`FolderBusy`, a sentence) while another command holds it, then waits up to
    ``wait`` seconds for workers of an earlier, killed command to stop (they hold ``workers``).
    """

    def __init__(self, folder: Path, name: str, what: str, wait: float | None = None):
        self.path = Path(folder) / f"{name}.lock"
        self.workers = Path(folder) / f"{name}.workers.lock"
        self.what = what
        self.wait = ORPHAN_WAIT if wait is None else wait
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        if fcntl is None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise FolderBusy(
                f"Another {self.what} (process {holder}) is running in '{self.path.parent}'; wait for it to end "
                f"(or stop it), then run this command again."
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._wait_for_orphans()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_for_orphans(self) -> None:
        fd = os.open(self.workers, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + self.wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return  # no worker of an earlier command is alive (closing the fd releases the lock)
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise FolderBusy(
                            f"Worker processes of an earlier {self.what} in '{self.path.parent}' are still running "
                            f"(they hold '{self.workers}'); stop them, then run this command again."
                        ) from None
                    time.sleep(0.1)
        finally:
            os.close(fd)

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock; the file stays (removing it would race a new command)
            self._fd = None
