"""A small tmpfs for tests of full disks and read-only folders.

We run the tests as root, so chmod cannot make a folder read-only; a real filesystem can.
``tmpfs(path, size)`` mounts one (skipping the test, with the reason, where ``mount`` is not
allowed: not root, or a container without CAP_SYS_ADMIN) and unmounts it afterwards;
``read_only(path)`` remounts it read-only for the body of a ``with``.
"""

from __future__ import annotations

import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@contextmanager
def tmpfs(path: Path, size: str = "4m"):
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    except FileNotFoundError:
        pytest.skip("no `mount` command here: a small tmpfs is needed to test a full disk or read-only media")
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({done.stderr.strip()}): it is needed to test a full disk or "
            f"read-only media (run the tests as root)"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextmanager
def read_only(path: Path):
    done = _mount("-o", "remount,ro", str(path))
    assert done.returncode == 0, done.stderr
    try:
        yield path
    finally:
        _mount("-o", "remount,rw", str(path))


def fill(path: Path, leave: int = 0) -> Path:
    """Fill the filesystem holding ``path`` up to ``leave`` free bytes with one file; return it."""
    import os

    filler = Path(path) / "filler"
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    with open(filler, "wb") as fh:
        try:
            fh.write(b"\0" * max(free - leave, 0))
        except OSError:
            pass
    return filler
