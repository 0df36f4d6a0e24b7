"""The run directory as a typed contract: what `train` writes and `evaluate`, `predict` and `info` read.

A run directory holds:

  model.keras              the trained model (its SHA-256 is recorded in run.json)
  run.json                 a :class:`RunInfo`: training config, class names, the cache's preprocessing,
                           the cache path and fingerprint, the clips trained and validated on, metrics
  history.csv, curves.png, report.json, report.txt, confusion_matrix.png

``models/latest`` is a one-line text file naming the newest run directory beside it (works where
symlinks don't). A run directory is written to a hidden temporary folder beside its destination
and renamed into place only when complete (:func:`publish_run`), so a directory named like a run
always has its run.json and the model that run.json describes.

Every way a run directory can be wrong (no run.json, invalid JSON, missing keys, no model,
another run's model, a garbage ``latest``) is one :class:`RunError` sentence.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from featpipe.cache.schema import PREPROCESSING_KEYS
from featpipe.errors import AdvisedOptionError, OptionError, RunError, RunWriteError
from featpipe.runtime import atomic
from featpipe.runtime.keras_import import import_keras

RUN_FILE = "run.json"
MODEL_FILE = "model.keras"
LATEST = "latest"
RUN_FORMAT = 2  # 1: run.json without run_format/run_id/model_sha256/train_clips (read, not checked)
_TMP_MARK = ".featpipe-tmp-"
_OLD_MARK = ".featpipe-old-"

# run.json keys every reader needs; a run.json without one of them is incomplete
REQUIRED_KEYS = ("class_names", "preprocessing", "cache_attrs", "cache", "cache_fingerprint", "head", "config")


@dataclass(frozen=True)
class RunInfo:
    """What a run directory's run.json says. ``to_dict``/``from_dict`` are the JSON form."""

    class_names: tuple[str, ...]
    preprocessing: dict  # backbone, weights, weights_fingerprint, input_size, frames, sampling, weights_seed
    cache_attrs: dict  # the cache's APPEND_KEYS attributes, copied verbatim
    cache: str  # the training cache (absolute path)
    cache_fingerprint: str  # featpipe.training.inputs.cache_fingerprint of that cache when training started
    head: dict  # featpipe.training.heads.config.HeadConfig.to_dict()
    config: dict  # TrainOptions as given (paths as strings)
    run_id: str | None = None  # None: a run written before run identity (RUN_FORMAT 1)
    model_sha256: str | None = None  # of model.keras; None: not recorded (RUN_FORMAT 1)
    train_clips: tuple[str, ...] | None = None  # cache "video" keys trained on; None: not recorded
    val_clips: tuple[str, ...] | None = None  # cache "video" keys validated on (early stopping)
    run_format: int = 1
    featpipe_version: str | None = None
    keras_version: str | None = None
    keras_backend: str | None = None
    created: str | None = None
    validation: str | None = None  # "val split" or the hold-out description
    streamed: bool = False
    epochs_run: int = 0
    best_epoch: int = 0
    refit_epochs: int = 0  # > 0: model.keras was trained on train + val (train_clips) for this many epochs
    interrupted: bool = False
    diverged: str | None = None  # training stopped on a NaN or infinite loss, in words (None: it did not)
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)  # {"val": {accuracy, macro_f1, roc_auc, n}, "test": {...}}

    def seen_outside(self, split: str) -> frozenset[str]:
        """Clips whose labels the run saw and that must not be scored as ``split``.

        Training clips never; early-stopping validation clips only as the "val" split, where train
        itself reported them.
        """
        seen = frozenset(self.train_clips or ())
        return seen if split == "val" else seen | frozenset(self.val_clips or ())

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for key in ("class_names", "train_clips", "val_clips"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data, where: str | Path = RUN_FILE) -> "RunInfo":
        """Validate a parsed run.json; RunError naming what is missing or malformed."""
        if not isinstance(data, dict):
            raise RunError(f"'{where}' does not hold a JSON object; the run directory is damaged. Train again.")
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise RunError(
                f"'{where}' is incomplete (no {', '.join(missing)}); the run directory is damaged. Train again."
            )
        pre = data["preprocessing"]
        if not isinstance(pre, dict) or any(k not in pre for k in PREPROCESSING_KEYS):
            lacking = ", ".join(k for k in PREPROCESSING_KEYS if not isinstance(pre, dict) or k not in pre)
            raise RunError(
                f"'{where}' is incomplete (its preprocessing lacks {lacking}); "
                f"the run directory is damaged. Train again."
            )
        names = data["class_names"]
        if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
            raise RunError(
                f"'{where}' has no valid class_names (a list of at least two names); the run directory "
                f"is damaged. Train again."
            )
        for key in ("cache_attrs", "head", "config"):
            if not isinstance(data[key], dict):
                raise RunError(f"'{where}' has a malformed '{key}' (expected an object); the run directory is damaged.")
        for key in ("train_clips", "val_clips"):
            value = data.get(key)
            if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise RunError(
                    f"'{where}' has a malformed '{key}' (expected a list of clip names); the run directory is damaged."
                )
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["class_names"] = tuple(names)
        for key in ("train_clips", "val_clips"):
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- finding and loading


def resolve_run(run: str | Path = "models/latest") -> Path:
    """A run directory from a path, where ``models/latest`` (a text file naming a run beside it) is followed."""
    path = Path(run)
    if path.name == LATEST and path.is_file():
        path = _follow_latest(path)
    if not path.exists() and path.name == LATEST:
        raise RunError(f"'{run}' does not exist: no run has been trained here yet. Train one with `featpipe train`.")
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is a file, not a run directory"
        raise RunError(f"'{run}' {what}. Pass a folder written by `featpipe train` (or models/latest).")
    if not (path / RUN_FILE).is_file():
        raise RunError(
            f"'{path}' is not a featpipe run directory (no {RUN_FILE}). Pass a folder written by `featpipe train`."
        )
    return path


def _follow_latest(latest: Path) -> Path:
    raw = latest.read_bytes()[:4097]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    name = text.strip() if text is not None else ""
    if (
        text is None
        or not name
        or "\n" in name
        or len(raw) > 4096
        or "/" in name
        or "\\" in name
        or name in (".", "..")
    ):
        raise RunError(
            f"'{latest}' does not name a run (it should hold one run directory's name); "
            f"pass a run directory instead, or train again to rewrite it."
        )
    target = latest.parent / name
    if not (target / RUN_FILE).is_file():
        raise RunError(
            f"'{latest}' names '{name}', which is not a run directory beside it "
            f"(deleted or moved?); pass a run directory instead, or train again to rewrite it."
        )
    return target


def read_run(run: str | Path = "models/latest") -> tuple[Path, RunInfo]:
    """(run directory, its validated RunInfo), without loading or checking the model."""
    run_dir = resolve_run(run)
    where = run_dir / RUN_FILE
    try:
        data = json.loads(where.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise RunError(f"'{where}' is not text ({exc.reason}); the run directory is damaged. Train again.") from None
    except ValueError as exc:
        raise RunError(f"'{where}' is not valid JSON ({exc}); the run directory is damaged. Train again.") from None
    except OSError as exc:
        raise RunError(f"Could not read '{where}': {exc.strerror or exc}.") from None
    return run_dir, RunInfo.from_dict(data, where)


def check_model_file(run_dir: Path, info: RunInfo) -> Path:
    """The run's model.keras, refused when missing or not the one run.json describes."""
    model_path = run_dir / MODEL_FILE
    if not model_path.is_file():
        raise RunError(f"'{run_dir}' has no {MODEL_FILE}; the training run did not finish. Train again.")
    if info.model_sha256 is not None and file_sha256(model_path) != info.model_sha256:
        raise RunError(
            f"'{model_path}' is not the model this run's {RUN_FILE} describes (another run's model, or "
            f"modified since training); copy run directories whole, or train again."
        )
    return model_path


def load_run(run: str | Path = "models/latest"):
    """(run directory, RunInfo, the Keras model) for a run folder or models/latest, every part checked."""
    keras = import_keras()

    import featpipe.training.heads.layers  # noqa: F401  registers the custom layers for safe-mode loading (lazy: Keras)

    run_dir, info = read_run(run)
    model_path = check_model_file(run_dir, info)
    try:
        model = keras.saving.load_model(model_path)
    except (ValueError, OSError, TypeError, KeyError) as exc:
        raise RunError(
            f"Could not load '{model_path}' ({exc}); it may be damaged or from another featpipe version."
        ) from None
    return run_dir, info, model


# ----------------------------------------------------------------------------- data identity


def overlap_with_training(info: RunInfo, videos, split: str, cache: str | Path) -> None:
    """Refuse to score a run on clips whose labels it saw while training (e.g. the cache was re-split)."""
    seen = info.seen_outside(split)
    overlap = sorted(set(map(str, videos)) & seen)
    if overlap and info.refit_epochs and set(overlap) <= set(info.val_clips or ()):
        raise RunError(
            f"This run was refit on train + val ({info.refit_epochs} epochs, after its val clips chose that count), "
            f"so {len(overlap)} of the {len(videos)} clips in the '{split}' split of '{cache}' were trained on; its "
            f"val scores before the refit are in its report.json. Evaluate the test split, or train with --no-refit "
            f"to keep val held out."
        )
    if overlap:
        raise RunError(
            f"{len(overlap)} of the {len(videos)} clips in the '{split}' split of '{cache}' were used to train this "
            f"run (e.g. {overlap[0]}): the cache was re-split since training, and these scores would be inflated; "
            f"evaluate on clips the run never saw, or train again on this cache."
        )


def cache_change_warning(info: RunInfo, cache: str | Path, fingerprint: str) -> str | None:
    """A one-line warning when the cache differs from the one the run was trained on, else None."""
    if fingerprint == info.cache_fingerprint:
        return None
    same_file = str(Path(cache).resolve()) == info.cache
    where = "has changed" if same_file else "is not the cache"
    return (
        f"warning: the cache '{cache}' {where} since this run was trained (fingerprint {fingerprint}, "
        f"trained on {info.cache_fingerprint}); the scores are not comparable with the run's own report."
    )


# ----------------------------------------------------------------------------- writing

# OSErrors that mean "this folder cannot take the run" (not a damaged input): full, read-only, forbidden
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


def raise_write_error(exc: OSError, where: Path) -> None:
    readonly = exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)  # a user's choice of folder: 2; full disk: 1
    reason = exc.strerror or str(exc)
    if readonly:
        raise RunWriteError(
            f"Cannot write the run directory in '{where}' ({reason}); train into a folder you can write to.", 2
        ) from None
    raise RunWriteError(
        f"Writing the run directory in '{where}' failed ({reason}); nothing was kept. Free some "
        f"space (or fix the folder) and train again.",
        1,
    ) from None


def check_destination(dest: Path, force: bool) -> None:
    """Refuse an --out that is a file, or an existing run directory without ``force``."""
    if dest.exists() and not dest.is_dir():
        raise OptionError("out", f"must be a folder, but '{dest}' is a file.")
    if not dest.is_dir() or not any(dest.iterdir()):
        return
    if not (dest / RUN_FILE).is_file():  # never delete a user's own folder, even with force
        raise OptionError(
            "out",
            f"names '{dest}', a folder that is not empty and not a run directory; "
            f"choose a new folder (featpipe replaces only run directories).",
        )
    if not force:
        problem = f"names '{dest}', which is already a run directory; "
        raise AdvisedOptionError(
            "out",
            problem + "pass force=True to replace it, or choose another folder.",
            problem + "pass --force to replace it, or choose another folder.",
        )


def make_temp_dir(dest: Path) -> Path:
    """A hidden folder beside ``dest`` to write the run into; stale ones of dead processes are removed."""
    parent = dest.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(parent)
        tmp = parent / f".{dest.name}{_TMP_MARK}{_owner()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as exc:
        raise_write_error(exc, parent)
    return tmp


def _owner() -> str:
    """Host and process id: a temporary name's owner (a shared folder may be written from several hosts)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _remove_stale(parent: Path) -> None:
    """Leftovers of killed trains on this host: temporary runs are removed, an old run set aside is restored."""
    host = socket.gethostname()
    for mark in (_TMP_MARK, _OLD_MARK):
        for path in parent.glob(f".*{mark}*"):
            name, _, owner = path.name[1:].rpartition(mark)
            owner_host, _, pid = owner.rpartition("-")
            if owner_host != host or not pid.isdigit() or _alive(int(pid)):
                continue
            dest = parent / name
            if mark == _OLD_MARK and path.is_dir() and not dest.exists():
                os.replace(path, dest)  # killed between "old aside" and "new in": the old run comes back
            elif path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a leftover of an earlier process that had our pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def discard_temp_dir(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def write_run_file(tmp: Path, info: RunInfo) -> None:
    """run.json, written last into the temporary folder (after model.keras, whose hash it records)."""
    try:
        (tmp / RUN_FILE).write_text(json.dumps(info.to_dict(), indent=2, allow_nan=False))
    except OSError as exc:
        raise_write_error(exc, tmp.parent)


def publish_run(tmp: Path, dest: Path, force: bool = False) -> Path:
    """Rename the complete temporary folder to ``dest``, replacing an old run only with ``force``.

    The old directory is renamed aside, the new one renamed in, then the old one deleted, so at every
    moment ``dest`` is either the whole old run or the whole new one. ``models/latest`` is then pointed
    at ``dest`` (written beside it and renamed over the old one).
    """
    old = None
    try:
        if dest.exists():
            check_destination(dest, force)
            old = dest.parent / f".{dest.name}{_OLD_MARK}{_owner()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(dest, old)
        try:
            atomic.replace(tmp, dest)  # and fsync the folder
        except OSError:
            if old is not None:
                os.replace(old, dest)  # put the old run back
                old = None
            raise
    except OSError as exc:
        discard_temp_dir(tmp)
        raise_write_error(exc, dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    update_latest(dest)
    return dest


def update_latest(run_dir: Path) -> None:
    """Point ``<parent>/latest`` at ``run_dir`` (unless ``latest`` is a folder of the user's)."""
    latest = run_dir.parent / LATEST
    if latest.is_dir():
        return
    try:
        atomic.write_text(latest, run_dir.name + "\n", tmp=run_dir.parent / f".{LATEST}{_TMP_MARK}{_owner()}")
    except OSError as exc:
        raise_write_error(exc, run_dir.parent)
