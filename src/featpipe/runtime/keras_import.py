"""Keep TensorFlow's start-up chatter off stderr: the one place featpipe imports Keras from.

Importing TensorFlow prints six to eight lines before featpipe says anything, some of them
twice (two shared libraries each log once) and one an ``E0000 ... failed call to cuInit`` that
reads like a failure on every CPU machine::

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 ... port.cc:153] oneDNN custom operations are on. ...
    I0000 ... cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
    E0000 ... cuda_platform.cc:52] failed call to cuInit: ... UNKNOWN ERROR (303)
    E0000 ... util.cc:131] oneDNN supports DT_BOOL only on platforms with AVX-512. ...

Two measures, both only when :func:`verbose` is false:

* ``TF_CPP_MIN_LOG_LEVEL=3`` (set before TensorFlow loads) silences what TensorFlow's C++ code
  logs at run time (the cuInit and DT_BOOL lines). It changes no numerics, unlike
  ``TF_ENABLE_ONEDNN_OPTS=0``, which is left alone.
* The ``absl::InitializeLog`` / oneDNN / cuda-driver lines are written by static initialisers
  while the shared libraries load, before any log level is read, so :func:`import_keras`
  points file descriptor 2 at a temporary file during the import and then replays every line
  that is not such start-up noise (a real error, a Python warning, a traceback still shows).

``--verbose`` on the command line, or ``FEATPIPE_VERBOSE=1`` in the environment, turns both off.
Library code that may be the first to load Keras calls :func:`import_keras` instead of writing
``import keras``, so the silencing is in effect whichever function loads it first (``featpipe.training.streaming`` and
``featpipe.training.heads`` call it at their top, and are imported lazily).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

VERBOSE_ENV = "FEATPIPE_VERBOSE"

# C++ log lines in absl/glog format: "I0000 00:00:1795462025.088793    4731 port.cc:153] message"
_LOG_LINE = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [^\]]+\] (.*)$")
# errors logged while the CUDA / oneDNN plugins load that are no failure of the run
_NOISY_ERRORS = ("failed call to cuInit", "Unable to register cu", "already been registered", "oneDNN supports")
_NOISE_LINES = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "To enable the following instructions:",  # second line of cpu_feature_guard's "optimized to use" notice
)


def verbose() -> bool:
    """True when TensorFlow's own logging should be shown (``FEATPIPE_VERBOSE`` set, not 0/false/no)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def set_verbose(on: bool) -> None:
    """What ``featpipe --verbose`` does: record the choice where every later import sees it."""
    if on:
        os.environ[VERBOSE_ENV] = "1"
    quiet_environment()


def quiet_environment() -> None:
    """Lower TensorFlow's C++ log level to fatal-only, unless verbose; a no-op once TensorFlow is loaded."""
    if not verbose() and "tensorflow" not in sys.modules:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"


def is_noise(line: str) -> bool:
    """Whether a stderr line printed while TensorFlow loads is start-up chatter (dropped unless verbose)."""
    text = line.rstrip("\r\n")
    if not text.strip() or text.startswith(_NOISE_LINES):
        return True
    match = _LOG_LINE.match(text)
    if match is None:
        return False
    level, message = match.groups()
    return level in "IW" or (level == "E" and any(s in message for s in _NOISY_ERRORS))


@contextlib.contextmanager
def _filtered_stderr():
    """Send file descriptor 2 to a temporary file for the block, then replay its lines that are not noise."""
    _flush_stderr()
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 (a closed stderr, an embedding host): nothing to filter
        yield
        return
    try:
        with tempfile.TemporaryFile() as captured:
            os.dup2(captured.fileno(), 2)
            try:
                yield
            finally:
                _flush_stderr()  # Python-level writes made during the block belong to the capture
                os.dup2(saved, 2)
                captured.seek(0)
                text = captured.read().decode(errors="replace")
                kept = [line for line in text.splitlines(True) if not is_noise(line)]
                if kept and sys.stderr is not None:
                    sys.stderr.write("".join(kept))
                    _flush_stderr()
    finally:
        os.close(saved)


def _flush_stderr() -> None:
    with contextlib.suppress(AttributeError, OSError, ValueError):  # None under pythonw, or closed
        sys.stderr.flush()


def import_keras():
    """``import keras`` (and with it the backend, usually TensorFlow) without the start-up chatter."""
    if "keras" in sys.modules or verbose():
        import keras

        return keras
    quiet_environment()
    with _filtered_stderr():
        import keras
    return keras
