"""Atomic file writes: write beside the destination, fsync, rename into place, fsync the folder.

Every file featpipe replaces (a cache, a journal's header, a run's ``latest`` pointer, a
checkpoint, a leaderboard, a predictions CSV, the sample data's marker) is written this way, so
a kill or a full disk at any moment leaves either the whole old file or the whole new one,
never a torn one, and no temporary behind:

    with atomic_path(dest) as tmp:      # h5py, Keras, matplotlib write to ``tmp``
        write(tmp)
    write_text(dest, "text")            # the same for a small text or bytes payload

The temporary is a name in the destination's folder (a rename is only atomic within one
file system); on any failure inside the block (an exception, Ctrl-C) it is removed and the
destination is untouched.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def fsync_dir(folder: Path) -> None:
    """Make a rename (or a new file) in ``folder`` durable; best effort where a folder cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def temporary_name(dest: Path) -> Path:
    """The default temporary for ``dest``: a hidden name beside it, owned by this process."""
    dest = Path(dest)
    return dest.with_name(f".{dest.name}.tmp-{os.getpid()}")


@contextmanager
def whole_or_nothing(path: Path) -> Iterator[Path]:
    """Write ``path`` inside the block; on success fsync it, on any failure (a full disk, Ctrl-C) remove it."""
    try:
        yield path
        fsync_file(path)
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise


def replace(tmp: Path, dest: Path) -> None:
    """Rename the finished (fsynced) file ``tmp`` over ``dest`` and fsync the folder."""
    os.replace(tmp, dest)
    fsync_dir(Path(dest).parent)


def install(tmp: Path, dest: Path) -> None:
    """Put a file written elsewhere (e.g. by a Keras callback) at ``tmp`` in place: fsync, rename, fsync the folder."""
    fsync_file(tmp)
    replace(tmp, dest)


@contextmanager
def atomic_path(dest: Path, tmp: Path | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``dest`` to write; when the block ends cleanly it replaces ``dest``.

    ``tmp`` names the temporary (it must be in ``dest``'s folder; a writer that infers the format from
    the suffix needs a name ending like ``dest``); by default a hidden name owned by this process.
    """
    dest = Path(dest)
    tmp = Path(tmp) if tmp is not None else temporary_name(dest)
    with whole_or_nothing(tmp):
        yield tmp
    try:
        replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(dest: Path, data: bytes, tmp: Path | None = None) -> Path:
    """Atomically replace ``dest`` with ``data``."""
    with atomic_path(dest, tmp) as path:
        with open(path, "wb") as fh:
            fh.write(data)
    return Path(dest)


def write_text(dest: Path, text: str, tmp: Path | None = None, encoding: str = "utf-8") -> Path:
    """Atomically replace ``dest`` with ``text``."""
    return write_bytes(dest, text.encode(encoding), tmp)
