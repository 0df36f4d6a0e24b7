"""Walking folders for clips: which files are videos, the one folder walk (`walk_clips`) and unreadable folders.

`extract` indexes class folders with it and `predict DIR` finds its clips with it, so both see
the same clips: video files by extension (any case), hidden entries skipped, linked folders
followed once, a folder that cannot be read reported (not an error) with the reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from featpipe.errors import DatasetError

VIDEO_EXTENSIONS: frozenset[str] = frozenset({".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg"})


def is_video(path: Path) -> bool:
    return _is_video_name(path.name)


def _is_video_name(name: str) -> bool:
    """``Path(name).suffix.lower() in VIDEO_EXTENSIONS``, without building a Path (run once per file indexed)."""
    dot = name.rfind(".")
    return 0 < dot < len(name) - 1 and name[dot:].lower() in VIDEO_EXTENSIONS


def visible(name: str) -> bool:
    return not name.startswith(".")


@dataclass(frozen=True)
class FolderClips:
    """What :func:`walk_clips` found under a folder: the clips, and the folders it could not read."""

    clips: tuple[Path, ...]  # video files, sorted
    unreadable: tuple[tuple[Path, str], ...] = ()  # (folder, why), whose clips could not be indexed


def walk_clips(folder: str | Path) -> FolderClips:
    """The one rule for the clips in a folder: `extract`'s class folders and `predict DIR` both use it.

    Video files (by extension, any case) under ``folder``, recursively, sorted; hidden files and
    folders (a leading '.') are skipped; symbolic links to folders are followed, each real folder
    visited once, so a link loop ends. A folder that cannot be listed, or listed but not entered
    (read without execute permission), is not an error here: it is returned in ``unreadable``
    with the reason, for the caller to report, and its clips are left out.
    """
    folder = Path(folder)
    found: list[Path] = []
    unreadable: list[tuple[Path, str]] = []
    seen: set[str] = set()
    stack = [folder]
    while stack:
        path = stack.pop()
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        try:
            with os.scandir(path) as it:
                entries = sorted((e for e in it if visible(e.name)), key=lambda e: e.name)
            if entries:  # listed, but can its entries be reached? (a folder with r but not x permission)
                _reachable(entries[0].path)
        except OSError as exc:
            unreadable.append((path, _reason(exc)))
            continue
        subfolders = []
        base = Path(path)  # one Path per folder; a clip's path is then a cheap child of it
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows a symbolic link
            except OSError:
                is_dir = False  # a link into a folder we may not enter: reported per clip if it is a video
            if is_dir:
                subfolders.append(Path(entry.path))
            elif _is_video_name(entry.name):
                found.append(base / entry.name)
        stack.extend(reversed(subfolders))
    return FolderClips(tuple(sorted(found)), tuple(unreadable))


def _reachable(path: str) -> None:
    """Raise PermissionError if the folder holding ``path`` may not be entered (other errors: a race, ignored)."""
    try:
        os.lstat(path)
    except PermissionError:
        raise
    except OSError:
        pass


def _reason(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    return exc.strerror or str(exc) or type(exc).__name__


def refuse_unreadable_folder(exc: OSError) -> None:
    """A folder that decides the dataset's layout (its root, a split folder) and cannot be listed is
    refused: its classes are unknown. (A class folder, or one below it, is reported and skipped.)"""
    raise DatasetError(
        f"Cannot read the folder '{exc.filename}': {_reason(exc)}; its clips would be left out of the dataset. "
        "Give your user read access to it (e.g. chmod a+rx) or move it out of the dataset."
    ) from exc


def unreadable_note(folder: str | Path, reason: str) -> str:
    """The sentence `extract` and `predict` print for a folder whose clips were not indexed."""
    return (
        f"cannot read the folder '{folder}' ({reason}): its clips were not indexed; "
        "give your user read access to it (e.g. chmod -R a+rX) and run again to include them."
    )


def is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a link we may not follow: not a folder we can index
        return False


def is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False
