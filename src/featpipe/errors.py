"""The one exception family featpipe raises for things a user can fix.

Library code raises these with a sentence that says what was expected, what was found and
what to do; only the ``featpipe.cli`` package turns them into a message and an exit status.
"""

from __future__ import annotations


class FeatpipeError(Exception):
    """A problem the user can act on. ``exit_code`` is what the CLI exits with."""

    exit_code = 2


class OptionError(FeatpipeError, ValueError):
    """An option value out of range or of the wrong kind.

    ``option`` is the Python parameter name (``batch_size``). ``str(exc)`` reads
    "batch_size must be ..." for the Python API; the CLI shows ``flag_message()`` instead,
    "--batch-size must be ...", so each caller reads the name it typed.
    """

    def __init__(self, option: str, problem: str):
        self.option = option
        self.problem = problem
        super().__init__(f"{option} {problem}")

    def flag_message(self, flags: dict[str, str] | None = None) -> str:
        flag = (flags or {}).get(self.option) or "--" + self.option.replace("_", "-")
        return f"{flag} {self.problem}"


class NoSampleClips(OptionError):
    """`sample-data` asked for 0 train, val and test clips: names the three parameters (API) or flags (CLI)."""

    def __init__(self):
        super().__init__("train", "")
        self.args = ("train, val and test are all 0: there would be no clip to write; ask for at least one.",)

    def __str__(self) -> str:
        return self.args[0]

    def flag_message(self, flags=None) -> str:
        return "--train, --val and --test are all 0: there would be no clip to write; ask for at least one."


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler or container runtime stopping us), handled exactly like Ctrl-C.

    It subclasses KeyboardInterrupt so every ``except KeyboardInterrupt`` that saves finished
    work also runs for SIGTERM; the CLI exits 143 for it instead of 130.
    """


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) as featpipe's signal handler raises it: a KeyboardInterrupt like any other.

    A subclass because CPython remembers a plain KeyboardInterrupt that passes out of some compiled code
    (it happened inside imports of scikit-learn and charset_normalizer) as "unhandled", even when featpipe
    catches it further up, and at exit kills itself with SIGINT: a parent saw status -2, not 130.
    """


class DatasetError(FeatpipeError):
    """The dataset folder, CSV or split lists cannot be indexed as asked."""


class VideoError(FeatpipeError):
    """One clip cannot be decoded or has no usable frame (recorded, never fatal to a run)."""

    exit_code = 1


class BackboneError(FeatpipeError):
    """Unknown backbone, bad input size, or weights that cannot be loaded."""


class CacheError(FeatpipeError):
    """The feature cache is missing, not featpipe's, of another schema, locked, or mismatched."""


class TrainingDiverged(FeatpipeError):
    """Training met a NaN or infinite loss before any epoch ended with a finite one: nothing to keep."""

    exit_code = 1


class ExtractionFailed(FeatpipeError):
    """The run finished but produced nothing usable, or ``--strict`` saw a failed clip."""

    exit_code = 1


class FolderBusy(FeatpipeError):
    """Another command (or the workers of a killed one) is still working in the folder."""


class TuneStorageError(FeatpipeError):
    """study.db or the leaderboard cannot be written or read: a read-only folder or a damaged study (exit 2),
    a full disk and the like (exit 1; the finished trials are kept)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class RunError(FeatpipeError):
    """A run directory (or models/latest) that cannot be used: missing, damaged, or inconsistent."""


class AdvisedOptionError(OptionError):
    """An OptionError whose advice names another option: the API reads ``force=True``, the CLI ``--force``."""

    def __init__(self, option: str, problem: str, cli_problem: str):
        super().__init__(option, problem)
        self.cli_problem = cli_problem

    def flag_message(self, flags: dict[str, str] | None = None) -> str:
        flag = (flags or {}).get(self.option) or "--" + self.option.replace("_", "-")
        return f"{flag} {self.cli_problem}"


class RunWriteError(FeatpipeError):
    """The run directory could not be written (read-only folder: exit 2; disk full and the like: exit 1)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class RunWarning(UserWarning):
    """The data a run is judged on changed since training (the CLI prints it as one line on stderr).

    A warning category, not an error: kept here so that every class a user may meet is in one file."""


class CannotWrite(CacheError):
    """The cache's folder cannot be written (read-only media, no permission): the lock file cannot be made."""


class DamagedCacheError(CacheError):
    """Rows of a cache fail their checksum: the file was damaged after it was written."""

    exit_code = 1
