"""Fitting the frozen shortcut of a recurrent head: a logistic regression of the segment means."""

from __future__ import annotations

import numpy as np

from featpipe.errors import FeatpipeError
from featpipe.runtime.keras_import import import_keras

keras = import_keras()


SHORTCUT_C = 0.05
"""Inverse L2 strength (scikit-learn's C) of the shortcut's logistic regression: strong, as few clips need."""


def fit_shortcut(model, chunks, labels, c: float = SHORTCUT_C) -> bool:
    """Fit the frozen ``shortcut_logits`` layer of a recurrent head (``shortcut > 0``) as scikit-learn's
    L2-regularised logistic regression on the model's own standardised segment means of the training clips.

    ``chunks`` yields ``(features, mask)`` arrays of the training clips, in the order of ``labels``. The
    means come from the model in inference mode (uniform frame positions), exactly what it computes at
    evaluate and predict time. Returns False (and does nothing) for a model without a shortcut.
    """
    if "shortcut_logits" not in {layer.name for layer in model.layers}:
        return False
    from sklearn.linear_model import LogisticRegression  # lazy: scikit-learn

    means = keras.Model(model.inputs, model.get_layer("shortcut_flat").output)
    design = []
    for features, mask in chunks:
        for lo in range(0, len(features), 256):
            batch = {"features": features[lo : lo + 256], "mask": mask[lo : lo + 256]}
            design.append(np.asarray(means(batch, training=False), dtype=np.float32))
    design = np.concatenate(design)
    labels = np.asarray(labels)
    if len(design) != len(labels):
        raise FeatpipeError(f"fit_shortcut got {len(design)} clips and {len(labels)} labels.")
    layer = model.get_layer("shortcut_logits")
    kernel = np.zeros(layer.kernel.shape, np.float32)
    bias = np.zeros(layer.bias.shape, np.float32)
    present = np.unique(labels)
    if len(present) >= 2:
        # Fewer clips than dimensions (the usual case): the L2-regularised solution lies in the span of the
        # clips, so fit on their coordinates in an orthonormal basis of that span (exact, and 10-100x faster).
        basis = np.linalg.svd(design, full_matrices=False)[2] if len(design) < design.shape[1] else None
        coords = design if basis is None else design @ basis.T
        probe = LogisticRegression(C=c, max_iter=2000).fit(coords, labels)
        coef = probe.coef_ if basis is None else probe.coef_ @ basis
        if len(probe.classes_) == 2:  # one weight vector: the logit of the second class against the first's 0
            kernel[:, probe.classes_[1]], bias[probe.classes_[1]] = coef[0], probe.intercept_[0]
        else:
            kernel[:, probe.classes_], bias[probe.classes_] = coef.T, probe.intercept_
    layer.set_weights([kernel, bias])
    return True


# --------------------------------------------------------------------------------------------
# Heads: name -> builder (x, mask, config) -> x. A new head is one builder plus one entry here
# and its name in featpipe.names.HEAD_NAMES (which the CLI reads without importing Keras).
# --------------------------------------------------------------------------------------------
