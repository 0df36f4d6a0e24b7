"""Locks beside a cache: the writers' exclusive ``<cache>.lock`` and the readers' shared ``<cache>.readers``."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from featpipe.cache.schema import lock_path, readers_path, write_error
from featpipe.errors import CacheError, CannotWrite


class CacheLock:
    """Exclusive, non-blocking lock on ``<cache>.lock``; the OS releases it if the process dies."""

    def __init__(self, cache: Path):
        self.path = lock_path(cache)
        self._fh = None

    def __enter__(self) -> "CacheLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a+")
        except OSError as exc:
            err = write_error(exc, self.path, "nothing was changed")
            raise (CannotWrite(str(err)) if err.exit_code == 2 else err) from None
        try:
            import fcntl

            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # Windows
            import msvcrt

            try:
                msvcrt.locking(self._fh.fileno(), msvcrt.LK_NBLCK, 1)
            except OSError:
                self._refuse()
        except OSError:
            self._refuse()
        return self

    def _refuse(self):
        self._fh.close()
        self._fh = None
        raise CacheError(
            f"Another featpipe extraction is writing '{self.path.name[:-5]}' right now. Wait for it to finish, "
            f"or write to another file with --output."
        )

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the descriptor releases the lock
            self._fh = None


# ----------------------------------------------------------------------------- readers
# A command reading a cache kept in part files (train --stream, evaluate, tune, info --verify) holds
# the file it opened for as long as it reads, and that file's virtual dataset opens its part files by
# name on every read. A writer that replaced the cache (extract, merge --force, --compact) must not
# delete the part files the old file still names while such a reader runs: HDF5 would read NaN there.
# So readers register with a shared flock on ``<cache>.readers`` (released by the OS if they die),
# and part files the cache no longer references are deleted only under an exclusive, non-blocking
# lock on it; while a reader holds it they stay, and the next write that finds no reader removes them.


def _flock(fh, mode: str, block: bool = False) -> bool:
    """flock ``fh`` shared ("sh") or exclusive ("ex"); False where it is held elsewhere (or cannot be taken)."""
    try:
        import fcntl
    except ImportError:  # Windows: an open file cannot be deleted there anyway
        return mode == "sh"
    flags = fcntl.LOCK_SH if mode == "sh" else fcntl.LOCK_EX
    try:
        fcntl.flock(fh.fileno(), flags if block else flags | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _open_readers_file(cache: Path):
    path = readers_path(cache)
    try:
        return open(path, "a+b")
    except OSError:
        try:
            return open(path, "rb")  # a read-only folder: no writer can delete parts there either
        except OSError:
            return None


class Reader:
    """This process's registration as a reader of a cache in part files (a shared lock on ``<cache>.readers``)."""

    def __init__(self, fh):
        self._fh = fh

    @classmethod
    def register(cls, cache: Path) -> "Reader | None":
        fh = _open_readers_file(cache)
        if fh is None:
            return None
        # a writer holds the exclusive lock only while it deletes unused part files: wait for that (bounded)
        for _ in range(400):
            if _flock(fh, "sh"):
                return cls(fh)
            time.sleep(0.025)
        fh.close()
        return None

    def release(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()  # closing the descriptor releases the lock


@contextmanager
def no_readers(cache: Path) -> Iterator[bool]:
    """True inside while no process reads ``cache`` (an exclusive lock on ``<cache>.readers``), else False."""
    fh = _open_readers_file(cache)
    if fh is None:
        yield True
        return
    try:
        yield _flock(fh, "ex")
    finally:
        fh.close()
