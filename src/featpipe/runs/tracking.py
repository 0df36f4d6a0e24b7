"""Experiment tracking: TensorBoard event files and MLflow runs, for `featpipe train` and `featpipe tune`.

* ``--tensorboard DIR``: Keras' own ``keras.callbacks.TensorBoard`` writes the run's event files into
  ``DIR/<run name>`` (``train/`` and ``validation/``), so many runs share one DIR and TensorBoard shows
  them side by side (``tensorboard --logdir DIR``).
* ``--mlflow URI`` (``sqlite:///mlflow.db``, or a tracking server's ``http://...``): one MLflow run per
  featpipe run, named like the run directory, in the experiment ``--mlflow-experiment`` (default
  "featpipe"): the run's settings as parameters, loss and accuracy per epoch (step = epoch, as in
  history.csv), the final metrics of report.json, and the run directory as artifacts. ``tune`` logs a
  parent run for the search, each finished trial as a child run, and the retrained best as a child too.

MLflow is an optional extra (``pip install "featpipe[mlflow]"``): :func:`require_mlflow` refuses the option
before any work when it is missing. Tracking is never worth a run: the first failure (server down, database
locked or unwritable) is one :class:`~featpipe.errors.RunWarning` and tracking stops for that run, while the
run directory is written as always.

Why featpipe's own per-epoch callback rather than ``mlflow.keras.MlflowCallback``: that callback logs through
MLflow's global active run, asynchronously, also logs every validation pass again without a step
(``validation_*`` at step 0), and hides failures in MLflow's logger; here every call goes through one
``MlflowClient`` for the run's id, synchronously, and a failure is the run's warning.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import time
import warnings
from pathlib import Path

from featpipe.errors import OptionError, RunWarning

INSTALL = 'pip install "featpipe[mlflow]"'
DEFAULT_EXPERIMENT = "featpipe"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests a run under the run it names
# TrainOptions fields that say where a run is tracked, not how it is trained: never logged as parameters
TRACKING_FIELDS = ("tensorboard", "mlflow", "mlflow_experiment", "mlflow_parent")
_NOT_PARAMS = (*TRACKING_FIELDS, "quiet", "force", "rnn")


def redact_uri(uri: str | None) -> str | None:
    """``uri`` with the password of ``scheme://user:password@host`` replaced by ``***``: what run.json, tune's
    report and warnings show (MLflow itself gets the URI as given; its own environment variables
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD keep credentials out of the command line)."""
    if not isinstance(uri, str):
        return uri
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(uri)
        password = parts.password
    except ValueError:
        return uri
    if not password:
        return uri
    user, _, host = parts.netloc.rpartition("@")
    name = user.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{name}:***@{host}"))


def mlflow_installed() -> bool:
    """Whether MLflow can be imported (without importing it; ``sys.modules["mlflow"] = None`` says no)."""
    if "mlflow" in sys.modules:
        return sys.modules["mlflow"] is not None
    return importlib.util.find_spec("mlflow") is not None


def require_mlflow(uri: str | None) -> None:
    """Refuse ``mlflow=URI`` in one sentence when MLflow is not installed (called when options are checked)."""
    if uri is None:
        return
    if not isinstance(uri, str) or not uri.strip():
        raise OptionError("mlflow", f"must be an MLflow tracking URI such as sqlite:///mlflow.db; got {uri!r}.")
    if not mlflow_installed():
        raise OptionError("mlflow", f"needs MLflow, which is not installed: run {INSTALL}.")


def tensorboard_callback(log_root: str | Path, run_name: str):
    """Keras' TensorBoard callback writing into ``log_root/run_name`` (per-epoch scalars, no profiling)."""
    from featpipe.runtime.keras_import import import_keras

    keras = import_keras()
    return keras.callbacks.TensorBoard(log_dir=str(Path(log_root) / run_name), update_freq="epoch", write_graph=False)


def _warn(uri: str, what: str, exc: BaseException) -> None:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if redact_uri(uri) != uri:  # the client's own message may quote the URI, password and all
        reason = reason.replace(uri, redact_uri(uri))
    if len(reason) > 200:
        reason = reason[:197] + "..."
    warnings.warn(
        f"warning: MLflow tracking at {redact_uri(uri)} failed while {what} ({type(exc).__name__}: {reason}); "
        f"tracking stopped, the run itself is not affected.",
        RunWarning,
        stacklevel=4,
    )


class MlflowRun:
    """One MLflow run, every call through one ``MlflowClient``; the first failure is a RunWarning and ends it.

    ``parent``: the run id this one is a child of (``tune``'s trials and retrained best)."""

    def __init__(
        self, uri: str, experiment: str, name: str, params: dict, parent: str | None = None, tags: dict | None = None
    ):
        self.uri = uri
        self.run_id: str | None = None
        self._client = None
        try:
            self._start(experiment, name, params, parent, tags or {})
        except Exception as exc:  # noqa: BLE001  any tracking failure: a warning, never a lost run
            _warn(uri, "starting the run", exc)
            self._client = None

    @property
    def active(self) -> bool:
        return self._client is not None and self.run_id is not None

    def _guard(self, what: str, fn, *args) -> None:
        """``fn(*args)`` while the run is tracked; its failure is the one warning, and tracking stops."""
        if not self.active:
            return
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001  any tracking failure: a warning, never a lost run
            _warn(self.uri, what, exc)
            self._client = None

    def _start(self, experiment: str, name: str, params: dict, parent: str | None, tags: dict) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
        tags = {**tags, **({PARENT_TAG: parent} if parent else {})}
        run = client.create_run(experiment_id, run_name=name, tags=tags)
        self._client, self.run_id = client, run.info.run_id
        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for lo in range(0, len(items), 100):  # MLflow takes at most 100 parameters per call
            client.log_batch(self.run_id, params=items[lo : lo + 100])

    def log_metrics(self, metrics: dict, step: int = 0, what: str = "logging metrics") -> None:
        self._guard(what, self._log_metrics, metrics, step)

    def _log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if _is_number(v)]
        if items:
            self._client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: dict) -> None:
        self._guard("setting tags", self._set_tags, tags)

    def _set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, folder: Path) -> None:
        self._guard(f"uploading {folder}", lambda: self._client.log_artifacts(self.run_id, str(folder)))

    def log_files(self, paths) -> None:
        for path in paths:
            self._guard(f"uploading {path}", lambda p=path: self._client.log_artifact(self.run_id, str(p)))

    def stop(self) -> None:
        """Log nothing more (a failure was already reported)."""
        self._client = None

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run ended (FINISHED, FAILED or KILLED); nothing more is logged to it."""
        self._guard("ending the run", lambda: self._client.set_terminated(self.run_id, status))
        self._client = None

    def epoch_callback(self):
        """A Keras callback logging each epoch's logs (loss, accuracy, val_loss, val_accuracy) with step = epoch."""
        from featpipe.runtime.keras_import import import_keras

        keras = import_keras()
        tracker = self

        class MlflowEpochs(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                tracker.log_metrics(logs or {}, step=epoch, what=f"logging epoch {epoch}")

        return MlflowEpochs()


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _param_value(value) -> str:
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."  # MLflow's limit on a parameter value


def final_metrics(metrics: dict) -> dict:
    """``{"final_test_accuracy": ..., "final_test_macro_f1": ..., "final_val_accuracy": ...}`` from report.json's
    metrics ("final_": the per-epoch metrics already use the names val_accuracy and val_loss)."""
    out = {}
    for split, m in metrics.items():
        for key in ("accuracy", "macro_f1", "roc_auc", "n"):
            if m.get(key) is not None:
                out[f"final_{split}_{key}"] = m[key]
    return out


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------


class TrainTracking:
    """What ``train`` tracks for one run: the TensorBoard callback and the MLflow run, started before fitting.

    Used as a context manager around the fit: leaving it by an exception ends the MLflow run as FAILED
    (KILLED for Ctrl-C or SIGTERM) unless :meth:`finish` logged the finished run."""

    def __init__(self, opts, index, run_name: str):
        self._callbacks = []
        self.mlflow: MlflowRun | None = None
        if opts.tensorboard is not None:
            log_dir = Path(opts.tensorboard) / run_name
            try:  # here, not in the callback's first epoch, where the failure would stop the fit
                log_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                warnings.warn(
                    f"warning: TensorBoard event files cannot be written into {log_dir} ({exc.strerror or exc}); "
                    "the run is not tracked there, the run itself is not affected.",
                    RunWarning,
                    stacklevel=4,
                )
            else:
                self._callbacks.append(tensorboard_callback(opts.tensorboard, run_name))
        if opts.mlflow is not None:
            self.mlflow = MlflowRun(
                opts.mlflow, opts.mlflow_experiment, run_name, train_params(opts, index), opts.mlflow_parent
            )
            if self.mlflow.active:
                self._callbacks.append(self.mlflow.epoch_callback())

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if self.mlflow is not None and self.mlflow.active:
            self.mlflow.end("KILLED" if kind is not None and issubclass(kind, KeyboardInterrupt) else "FAILED")
        return False

    def callbacks(self) -> list:
        return list(self._callbacks)

    def finish(self, result) -> None:
        """The finished run (a TrainResult): final metrics, the published run directory as artifacts, ended."""
        if self.mlflow is None or not self.mlflow.active:
            return
        self.mlflow.log_metrics(
            {**final_metrics(result.metrics), "best_epoch": result.best_epoch, "epochs_run": result.epochs_run},
            what="logging final metrics",
        )
        self.mlflow.set_tags({"featpipe.run_dir": str(Path(result.run_dir).resolve())})
        self.mlflow.log_artifacts(result.run_dir)
        self.mlflow.end("KILLED" if result.interrupted else "FINISHED")


def train_params(opts, index) -> dict:
    """The run's config as MLflow parameters: train's options (paths as text), the backbone and the frames seen."""
    config = {k: v for k, v in dataclasses.asdict(opts).items() if k not in _NOT_PARAMS}
    return {
        **config,
        "frames": opts.frames if opts.frames is not None else index.config.frames,
        "backbone": index.config.backbone,
        "input_size": index.config.input_size,
        "cache": str(Path(index.path).resolve()),
        "classes": len(index.class_names),
    }


# --------------------------------------------------------------------------------------------
# tune
# --------------------------------------------------------------------------------------------


def tune_parent(opts, cache: Path, result) -> MlflowRun:
    """The search's parent run, with each finished trial of the leaderboard as a child run (its parameters
    and score); the caller retrains the best as a child of ``parent.run_id``, logs the search's files
    (``parent.log_files``) and ends it."""
    params = {k: v for k, v in dataclasses.asdict(opts).items() if k not in (*TRACKING_FIELDS, "quiet")}
    params = {**params, "cache": str(Path(cache).resolve()), "cv": result.cv}
    parent = MlflowRun(opts.mlflow, opts.mlflow_experiment, f"tune-{Path(cache).stem}", params)
    if not parent.active:
        return parent
    parent.set_tags({"featpipe.tune_dir": str(Path(result.out).resolve())})
    for rank, row in enumerate(result.leaderboard, 1):
        child = MlflowRun(
            opts.mlflow,
            opts.mlflow_experiment,
            f"trial-{row['number']}",
            row["params"],
            parent.run_id,
            {"featpipe.trial": row["number"]},
        )
        if not child.active:  # the warning is said: nothing more is logged for this search
            parent.stop()
            return parent
        child.log_metrics(
            {"mean_val_accuracy": row["mean"], "std": row["std"], "mean_val_loss": row["loss"], "rank": rank},
            what=f"logging trial {row['number']}",
        )
        child.end()
    if result.best is not None:
        parent.log_metrics({"best_mean_val_accuracy": result.best["mean"], "trials": len(result.leaderboard)})
    return parent
