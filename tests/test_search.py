"""featpipe.training.search: TuneOptions, stratified folds and how a trial is scored."""

from __future__ import annotations

import numpy as np
import pytest

from caches import tiny_cache
from featpipe.errors import FeatpipeError, OptionError
from featpipe.training.search import TuneOptions, plan_fits, stratified_folds

# ---------------------------------------------------------------- folds


def test_stratified_folds_partition_the_clips_and_spread_every_class_evenly():
    labels = np.array([0] * 9 + [1] * 6 + [2] * 4)
    folds = stratified_folds(labels, 3, seed=1)
    val = np.concatenate([va for _, va in folds])
    assert sorted(val.tolist()) == list(range(len(labels))), "every clip is in exactly one val fold"
    for train, va in folds:
        assert not set(train) & set(va) and len(train) + len(va) == len(labels)
        counts = np.bincount(labels[va], minlength=3)
        assert counts[0] == 3 and counts[1] == 2 and counts[2] in (1, 2), counts
    again = stratified_folds(labels, 3, seed=1)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again)), "the same seed, the same folds"


def test_a_class_smaller_than_the_fold_count_is_refused_with_what_to_do():
    with pytest.raises(FeatpipeError, match="fewer than the 3 folds.*--cv seeds"):
        stratified_folds(np.array([0, 0, 0, 1, 1]), 3, seed=0)


def test_small_val_splits_are_scored_by_kfold_on_train_plus_val_and_large_ones_by_seeds(tmp_path):
    from featpipe.training.inputs import open_index

    index = open_index(tiny_cache(tmp_path / "c.h5"))
    mode, fits = plan_fits(index, TuneOptions(cache=index.path))
    assert mode == "folds" and len(fits) == 3
    pool = set(index.rows("train")) | set(index.rows("val"))
    assert set(np.concatenate([va for _, va, _ in fits]).tolist()) == pool
    assert not set(np.concatenate([va for _, va, _ in fits]).tolist()) & set(index.rows("test")), "test never used"
    mode, fits = plan_fits(index, TuneOptions(cache=index.path, cv="seeds", seeds=2))
    assert mode == "seeds" and [s for _, _, s in fits] == [0, 1]


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"trials": 0}, "trials"),
        ({"jobs": 0}, "jobs"),
        ({"trials": None}, "trials"),
        ({"heads": ("cnn-lstm",)}, "heads"),
        ({"cv": "loo"}, "cv"),
        ({"time_budget": -1.0}, "time_budget"),
    ],
)
def test_bad_options_are_refused_naming_the_option(kwargs, flag):
    with pytest.raises(OptionError) as err:
        TuneOptions(**kwargs)
    assert err.value.option == flag
