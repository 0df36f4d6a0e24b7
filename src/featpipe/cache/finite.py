"""Whether features are finite: the one test behind extract's refusal to write and train's to read them."""

from __future__ import annotations

import numpy as np


def non_finite_rows(x: np.ndarray) -> np.ndarray:
    """One bool per row of ``x`` (a clip per row, or a frame per row): True where any value is NaN or infinite."""
    x = np.asarray(x)
    return ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
