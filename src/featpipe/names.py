"""Names shared by the library and the CLI, defined once and importable without Keras.

The CLI builds its choices from these at start-up, so this module must stay free of heavy imports;
``featpipe.training.heads.HEADS`` (name -> builder) is checked against :data:`HEAD_NAMES` when it is built.
"""

from __future__ import annotations

HEAD_NAMES = ("gru", "lstm", "bilstm", "attention", "transformer", "mean", "segments", "cnn-lstm")
"""Classifier heads, in the order the CLI and docs/cli.md list them (featpipe.training.heads.HEADS builds each)."""

RECURRENT_HEADS = ("gru", "lstm", "bilstm")
"""Feature heads built on a recurrent stack (they take --pooled-steps and --shortcut)."""

IMAGE_HEADS = ("cnn-lstm",)
"""Heads that classify raw frames (a ``--backbone raw`` cache) rather than feature vectors."""

SPLITS = ("train", "val", "test")
"""Dataset splits, in order (a dataset, a cache and the sample data all use these names)."""

SAMPLING = ("uniform", "first")
"""How frames are picked from a clip: evenly over all of it, or the first N."""

DECODERS = ("auto", "pyav", "opencv")
"""Video decoders: ``auto`` (PyAV seeking, sequential where a clip cannot be sought reliably), ``pyav``
(the same, and PyAV must be installed), ``opencv`` (OpenCV, every frame in order: the reference)."""

DTYPES = ("float16", "float32")
"""Storage types of cached features."""

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
"""Backbone compute precisions (Keras dtype policies)."""

ENGINES = ("local", "ray")
"""Where extraction runs the backbone."""

CLASS_WEIGHTS = ("balanced",)
"""Class weightings `train` offers."""

CV_MODES = ("auto", "folds", "seeds")
"""How `tune` scores a trial."""

DIFFICULTIES = ("easy", "hard")
"""Sample-data difficulties."""

REFIT_BELOW = 50
"""`train` refits on train + val by default when the smallest class of the train split has fewer clips than this."""
