"""featpipe.training.options: TrainOptions checks and the head defaults (test_options.py: featpipe.options)."""

from __future__ import annotations

import pytest

from featpipe.training.train import train


def test_the_api_names_the_parameter_not_the_flag():
    from featpipe.errors import OptionError
    from featpipe.training.options import TrainOptions

    with pytest.raises(OptionError, match=r"^lr must be a finite number") as exc:
        TrainOptions(lr=float("inf"))
    assert exc.value.option == "lr"
    with pytest.raises(OptionError, match=r"^num_heads must be"):
        train(num_heads=0)


@pytest.mark.parametrize(
    "head, l2", [("gru", 0.1), ("bilstm", 0.1), ("segments", 0.1), ("mean", 0.0), ("attention", 0.0)]
)
def test_the_classifier_l2_defaults_per_head_and_an_explicit_value_wins(head, l2):
    from featpipe.training.options import TrainOptions, resolve_defaults

    assert resolve_defaults(TrainOptions(head=head)).l2 == l2
    assert resolve_defaults(TrainOptions(head=head, l2=0.0)).l2 == 0.0
    assert resolve_defaults(TrainOptions(head=head, l2=1.5)).l2 == 1.5
