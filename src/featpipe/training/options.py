"""Everything `featpipe train` can be told, and the head defaults measured for few clips.

:class:`TrainOptions` checks each value on construction; :func:`resolve_defaults` fills the regularisers a
head has defaults for (:data:`HEAD_DEFAULTS`); :func:`head_config` turns options into the model's HeadConfig.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from featpipe.errors import OptionError
from featpipe.names import CLASS_WEIGHTS, HEAD_NAMES, RECURRENT_HEADS
from featpipe.options import check_choice, check_dir_option, check_float, check_int, split_list_options
from featpipe.runs.tracking import require_mlflow
from featpipe.training.heads.config import HeadConfig

# upper bounds: far beyond any useful value, low enough to fail with a sentence instead of MemoryError
MAX_EPOCHS = 100_000
MAX_BATCH = 65_536
MAX_UNITS = 16_384
MAX_LAYERS = 64
MAX_HEADS = 256
MAX_L2 = 100.0


@dataclass(frozen=True)
class TrainOptions:
    """Everything `featpipe train` can be told. Defaults are the CLI's defaults."""

    cache: str | Path | None = None  # cache file; None = the single .h5 in cache_dir
    cache_dir: str | Path = "cache"
    head: str = "gru"  # sequence head (featpipe.training.heads.registry.HEADS)
    units: int = 64
    layers: int = 1
    dropout: float = 0.3
    num_heads: int = 4  # transformer only
    epochs: int = 150
    batch_size: int = 32
    lr: float = 3e-3
    patience: int = 20  # epochs without val_loss improvement before stopping
    seed: int = 0
    class_weight: str | None = None  # None or "balanced"
    stream: bool | None = None  # True stream from HDF5, False in memory, None auto
    val_fraction: float = 0.15  # stratified hold-out from train when the cache has no val split
    models_dir: str | Path = "models"
    out: str | Path | None = None  # run directory; default models/<backbone>-<head>-<time>
    quiet: bool = False
    force: bool = False  # replace an existing run directory at `out`
    allow_shard: bool = False  # train on one shard of a sharded extraction (a fraction of the clips)

    # --- regularisation for few clips (issue 10; defaults measured on the hard sample set, see docs/training.md)
    frames: int | None = None  # steps the head sees; None = the cache's. Fewer: a new jittered subset each epoch
    segments: int = 4  # segments head: temporal segments
    # None = the head's default (HEAD_DEFAULTS; 0 where it has none), resolved by resolve_defaults()
    bottleneck: int | None = None  # learned Dense(bottleneck) + dropout on the standardised features (0 = none)
    pca: int = 0  # PCA-whitening projection fitted on the train frames, saved in the model (0 = none)
    input_dropout: float | None = None  # feature dropout (whole channels of a clip)
    weight_decay: float | None = None  # AdamW decoupled weight decay (0 = Adam)
    label_smoothing: float = 0.0
    pooled_steps: int = 0  # recurrent heads read the means of this many temporal segments (0 = every frame)
    shortcut: int | None = None  # recurrent heads: a frozen logistic regression of this many segment means (0 = none)
    l2: float | None = None  # L2 penalty on the trained classifier's weights (0 = none)
    # after early stopping chose the epoch count on val, train a fresh model on train + val for that many epochs;
    # None = auto: when the smallest class of the train split has fewer than REFIT_BELOW clips
    refit: bool | None = None
    rnn: str | None = None  # the older name of ``head``, still accepted (it wins when given); None after construction

    # --- tracking (featpipe.runs.tracking): where the run is reported, never how it is trained
    tensorboard: str | Path | None = None  # TensorBoard event files into <tensorboard>/<run name>
    mlflow: str | None = None  # MLflow tracking URI (sqlite:///mlflow.db, http://host:5000); needs the mlflow extra
    mlflow_experiment: str = "featpipe"  # the MLflow experiment the run is logged in
    mlflow_parent: str | None = None  # the MLflow run id this run is a child of (tune's retrained best)

    def __post_init__(self) -> None:
        split_list_options(self)  # no list-valued option yet; a future one takes "a,b" like the CLI
        if self.rnn is not None:  # train(rnn="lstm") keeps working: the older spelling of head
            object.__setattr__(self, "head", self.rnn)
            object.__setattr__(self, "rnn", None)
        check_choice("head", self.head, HEAD_NAMES)
        check_int("units", self.units, 1, MAX_UNITS)
        check_int("layers", self.layers, 1, MAX_LAYERS)
        check_float("dropout", self.dropout, 0.0, 1.0, high_open=True)
        check_int("num_heads", self.num_heads, 1, MAX_HEADS)
        check_int("epochs", self.epochs, 1, MAX_EPOCHS)
        check_int("batch_size", self.batch_size, 1, MAX_BATCH)
        check_float("lr", self.lr, 0.0, 10.0, low_open=True)
        check_int("patience", self.patience, 1, MAX_EPOCHS)
        check_int("seed", self.seed, 0, 2**32 - 1)
        check_choice("class_weight", self.class_weight, CLASS_WEIGHTS, optional=True)
        check_float("val_fraction", self.val_fraction, 0.0, 0.9, low_open=True)
        check_dir_option("cache_dir", self.cache_dir)
        check_dir_option("models_dir", self.models_dir)
        check_dir_option("out", self.out, optional=True)
        check_int("frames", self.frames, 1, 10_000, optional=True)
        check_int("segments", self.segments, 1, 1_000)
        check_int("bottleneck", self.bottleneck, 0, MAX_UNITS, optional=True)
        check_int("pca", self.pca, 0, 100_000)
        check_float("input_dropout", self.input_dropout, 0.0, 1.0, high_open=True, optional=True)
        check_float("weight_decay", self.weight_decay, 0.0, 1.0, optional=True)
        check_float("label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        check_int("pooled_steps", self.pooled_steps, 0, 10_000)
        check_int("shortcut", self.shortcut, 0, 10_000, optional=True)
        check_float("l2", self.l2, 0.0, MAX_L2, optional=True)
        check_dir_option("tensorboard", self.tensorboard, optional=True)
        require_mlflow(self.mlflow)  # before any work: the missing install in one sentence
        if not isinstance(self.mlflow_experiment, str) or not self.mlflow_experiment.strip():
            raise OptionError("mlflow_experiment", f"must be a non-empty name; got {self.mlflow_experiment!r}.")
        if self.cache is not None and Path(self.cache).is_dir():
            raise OptionError("cache", f"must be a cache file, but '{self.cache}' is a folder.")


# What `train --head gru|lstm|bilstm` uses unless told otherwise: measured on the hard sample set with 16-20
# train clips per class (docs/training.md, the few-clip defaults): alone, the recurrent path overfits (0.81-0.84 test
# accuracy); the segment-mean shortcut, fitted as a logistic regression before training (heads.shortcut.fit_shortcut),
# with the L2 penalty on the recurrent correction, brings gru and lstm within 0.02 of a logistic-regression
# probe on the same segment means, on VGG16 and InceptionV3 features alike.
RECURRENT_DEFAULTS = {"bottleneck": 32, "input_dropout": 0.2, "weight_decay": 0.01, "shortcut": 4, "l2": 0.1}
# every head's defaults for the regularisers above; a head not listed, or a key a head does not list, gets 0
HEAD_DEFAULTS = {**{head: RECURRENT_DEFAULTS for head in RECURRENT_HEADS}, "segments": {"l2": 0.1}}


def resolve_defaults(opts: TrainOptions) -> TrainOptions:
    """``opts`` with every None regulariser replaced by its head's default."""
    defaults = HEAD_DEFAULTS.get(opts.head, {})
    changes = {k: defaults.get(k, type(v)(0)) for k, v in RECURRENT_DEFAULTS.items() if getattr(opts, k) is None}
    if opts.pca and "bottleneck" in changes:
        changes["bottleneck"] = 0  # a PCA projection replaces the learned bottleneck
    return dataclasses.replace(opts, **changes)


def head_config(opts: TrainOptions, frames: int):
    """The model's HeadConfig from ``opts`` (regularisers resolved), with ``frames`` steps (0 = the cache's)."""
    fields = (
        "units",
        "layers",
        "dropout",
        "num_heads",
        "segments",
        "bottleneck",
        "pca",
        "input_dropout",
        "pooled_steps",
        "shortcut",
        "l2",
    )
    return HeadConfig(head=opts.head, frames=frames, **{name: getattr(opts, name) for name in fields})
