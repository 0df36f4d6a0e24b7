"""Shared test fixtures.

Real clips live in ``../shared/fixtures/real/`` beside the checkout (never copied into the
repository); tests that need them skip when that folder is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_FIXTURES = Path(os.environ.get("FEATPIPE_REAL_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures" / "real"))


@pytest.fixture
def real_fixtures() -> Path:
    """Folder of real-world clips (UCF101 AVI, Kinetics and ActivityNet H.264)."""
    if not REAL_FIXTURES.is_dir():
        pytest.skip(f"real video fixtures not found at {REAL_FIXTURES}")
    return REAL_FIXTURES


@pytest.fixture
def parted(monkeypatch):
    """Every cache with at least one clip is written in part files (as caches over 64 MB are)."""
    monkeypatch.setenv("FEATPIPE_ONE_FILE_MB", "0")


@pytest.fixture
def default_threshold(monkeypatch):
    """Tests see featpipe's default 64 MB threshold whatever the shell sets (the cache tests use it for every test)."""
    monkeypatch.delenv("FEATPIPE_ONE_FILE_MB", raising=False)


@pytest.fixture
def no_keras_hub(monkeypatch):
    """As if the hub extra were not installed, whatever this venv has."""
    import sys

    monkeypatch.setitem(sys.modules, "keras_hub", None)


@pytest.fixture(scope="module")
def two_clips(tmp_path_factory) -> Path:
    """The smallest dataset extract takes: two classes, one short clip each (6 frames, 48 px), all in train."""
    from videos import write_video

    root = tmp_path_factory.mktemp("two") / "data"
    for name in ("a", "b"):
        write_video(root / name / f"{name}.mp4", 6, 48, 48)
    return root
