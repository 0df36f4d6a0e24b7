"""Training that meets a NaN or infinite loss stops, and never keeps such an epoch as its best.

Keras alone does neither: without ``TerminateOnNaN`` a diverged fit runs on for ``patience``
epochs of NaN, and ``ModelCheckpoint``/``EarlyStopping`` compare with ``<``, which is False for
NaN, except on the first epoch, whose value (NaN included) is always "the best so far". This
module imports Keras at the top; featpipe.training.train imports it lazily, inside the fit.
"""

from __future__ import annotations

import math

from featpipe.runtime.keras_import import import_keras

keras = import_keras()


def finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


class StopOnNonFinite(keras.callbacks.TerminateOnNaN):
    """``keras.callbacks.TerminateOnNaN``, quiet and remembering where: after the batch whose training loss
    is NaN or infinite (or the epoch whose ``val_loss`` is), ``model.stop_training`` ends the fit; the
    epoch's end-of-epoch callbacks still run (see :class:`FiniteCheckpoint`). ``what`` then says it in
    words ("the training loss became NaN in epoch 3, batch 2"); None while all is finite."""

    def __init__(self):
        super().__init__()
        self.what: str | None = None
        self._epoch = 0

    def on_train_begin(self, logs=None):
        self.what = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def _stop(self, which: str, value, where: str) -> None:
        if self.what is None:
            kind = "NaN" if math.isnan(float(value)) else "infinite"
            self.what = f"the {which} became {kind} in epoch {self._epoch + 1}{where}"
        self.model.stop_training = True

    def on_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not finite(loss):
            self._stop("training loss", loss, f", batch {batch + 1}")

    def on_epoch_end(self, epoch, logs=None):
        for key, which in (("loss", "training loss"), ("val_loss", "validation loss")):
            value = (logs or {}).get(key)
            if value is not None and not finite(value):
                self._stop(which, value, "")


class FiniteCheckpoint(keras.callbacks.ModelCheckpoint):
    """``ModelCheckpoint`` that passes over an epoch whose loss or monitored value is NaN or infinite, so the
    checkpoint (and the best epoch) is always one with a finite loss; none at all if no epoch had one."""

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if all(finite(logs[key]) for key in ("loss", self.monitor) if key in logs):
            super().on_epoch_end(epoch, logs)


def best_epoch(history: list[dict], monitor: str = "val_loss") -> int:
    """The 1-based epoch of ``history`` (one dict per epoch) with the lowest ``monitor`` among the epochs whose
    loss and ``monitor`` are finite (the first of equals, as ModelCheckpoint keeps it); 0 when there is none."""
    best, at = math.inf, 0
    for i, row in enumerate(history):
        value = row.get(monitor)
        if finite(row.get("loss", 0.0)) and finite(value) and float(value) < best:
            best, at = float(value), i + 1
    return at
