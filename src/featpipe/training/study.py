"""The Optuna study of `featpipe tune` in ``study.db``: its name, loading it, settling it after an
interruption, ranking its finished trials, and turning storage failures into sentences.
"""

from __future__ import annotations

import errno
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from featpipe.errors import FeatpipeError, TuneStorageError
from featpipe.runs.rundir import WRITE_ERRNOS
from featpipe.training.inputs import cache_fingerprint
from featpipe.training.search import TuneOptions, defaults_as_trial


def study_name(index, opts: TuneOptions, mode: str) -> str:
    """The study's name in ``study.db``: the cache's fingerprint and everything that changes a trial's score."""
    n = opts.folds if mode == "folds" else opts.seeds
    return f"{cache_fingerprint(index.path)}-{mode}{n}-seed{opts.seed}-{'+'.join(opts.heads)}"


def _storage_url(db: Path) -> str:
    return f"sqlite:///{db.resolve()}"


def load_study(db: Path, name: str, seed: int):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(_storage_url(db), engine_kwargs={"connect_args": {"timeout": 60}})
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=6)
    return optuna.create_study(
        study_name=name, storage=storage, sampler=sampler, direction="maximize", load_if_exists=True
    )


def study_trials(db: str | Path, name: str) -> list:
    """Every trial of study ``name`` in ``db`` (empty when there is none yet)."""
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=_storage_url(Path(db))).trials
    except KeyError:
        return []


def complete_trials(study) -> list:
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def waiting_trials(study) -> list:
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))


def settle(study, heads: tuple[str, ...], cache_frames: int) -> tuple[int, int]:
    """Make the study whole again after an interruption; called while no worker runs (the lock is held).

    A trial still RUNNING belongs to a worker that was stopped or killed: it is failed (the leaderboard
    lists finished trials only). Each head's default configuration that is neither finished nor waiting
    (first run, or its trial was failed that way) is queued; workers take queued trials first, and the
    search does not end before the queue is empty. Returns (trials failed, defaults queued).
    """
    import optuna

    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in running:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
    kept = complete_trials(study) + waiting_trials(study)
    queued = 0
    for head in heads:
        params = defaults_as_trial(head, cache_frames)
        if not any(t.system_attrs.get("fixed_params", t.params) == params for t in kept):
            study.enqueue_trial(params, user_attrs={"default": head})
            queued += 1
    return len(running), queued


# --------------------------------------------------------------------------------------------
# Storage errors: sentences
# --------------------------------------------------------------------------------------------

_FULL = ("database or disk is full", "disk i/o error", "no space left")
_READ_ONLY = ("readonly database", "read-only", "unable to open database file", "permission denied")
_DAMAGED = ("file is not a database", "malformed", "not a database")


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        orig = getattr(exc, "orig", None)  # SQLAlchemy's wrapper of the sqlite3 error
        if isinstance(orig, BaseException):
            yield orig
        exc = exc.__cause__ or exc.__context__


def storage_error(exc: BaseException, out: Path) -> TuneStorageError | None:
    """The sentence for an error of the study's storage (SQLAlchemy, Optuna or the OS), or None for anything else."""
    import sqlite3

    import sqlalchemy.exc
    from optuna.exceptions import StorageInternalError

    db = out / "study.db"
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            reason = e.strerror or str(e)
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return TuneStorageError(
                    f"Cannot write the search's files in '{out}' ({reason}); pass an --out folder you can write to."
                )
            return TuneStorageError(
                f"Writing the search's files in '{out}' failed ({reason}); the finished trials are kept in "
                f"{db.name}. Free some space and run the same command again to resume.",
                1,
            )
        if not isinstance(e, (sqlalchemy.exc.SQLAlchemyError, StorageInternalError, sqlite3.Error)):
            continue
        text = str(e).lower()
        reason = str(getattr(e, "orig", None) or e).splitlines()[0]
        if any(k in text for k in _DAMAGED):
            return TuneStorageError(
                f"The study '{db}' is damaged ({reason}) and cannot be resumed; move it away (or restore a copy) "
                f"and run the same command again to start the search anew."
            )
        if any(k in text for k in _READ_ONLY):
            return TuneStorageError(f"Cannot write the study '{db}' ({reason}); pass an --out folder you can write to.")
        if any(k in text for k in _FULL):
            return TuneStorageError(
                f"Writing the study '{db}' failed ({reason}); the finished trials are kept. Free some space and "
                f"run the same command again to resume.",
                1,
            )
    return None


@contextmanager
def storage_errors(out: Path):
    try:
        yield
    except (OSError, Exception) as exc:
        if isinstance(exc, FeatpipeError):
            raise
        error = storage_error(exc, out)
        if error is None:
            raise
        raise error from None


def leaderboard(study) -> list[dict]:
    """Finished trials, best first: mean and std of their validation accuracies."""
    rows = []
    for t in complete_trials(study):
        scores = t.user_attrs.get("scores", [])
        rows.append(
            {
                "number": t.number,
                "params": t.user_attrs.get("params", dict(t.params)),
                "mean": float(np.mean(scores)) if scores else float("nan"),
                "std": float(np.std(scores)) if scores else float("nan"),
                "loss": float(np.mean(t.user_attrs.get("losses", [float("nan")]))),
                "scores": scores,
                "seconds": t.user_attrs.get("seconds"),
            }
        )
    rows.sort(key=lambda r: (-r["mean"], r["loss"], r["number"]))
    return rows
