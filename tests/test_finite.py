"""featpipe.cache.finite: the one test for NaN or infinite features, per clip row or per frame row."""

from __future__ import annotations

import numpy as np

from featpipe.cache.finite import non_finite_rows


def test_a_row_is_flagged_when_any_of_its_values_is_nan_or_infinite():
    x = np.zeros((4, 3, 2), np.float16)
    x[1, 2, 1] = np.nan
    x[3, 0, 0] = np.inf
    assert non_finite_rows(x).tolist() == [False, True, False, True]
    with np.errstate(over="ignore"):
        overflowed = np.float32([[70000.0], [1.0]]).astype(np.float16)
    assert non_finite_rows(overflowed).tolist() == [True, False], "a float16 overflow is infinite"
