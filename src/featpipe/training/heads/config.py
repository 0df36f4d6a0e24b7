"""The hyper-parameters of one classifier head (no Keras import: run.json readers and options use it)."""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, fields

from featpipe.errors import FeatpipeError, OptionError
from featpipe.names import HEAD_NAMES
from featpipe.options import check_choice, check_float, check_int


@dataclass(frozen=True)
class HeadConfig:
    """Hyper-parameters of one classifier head. Validated on construction (OptionError naming the field)."""

    head: str = "gru"  # one of HEADS
    units: int = 64  # recurrent units / model width
    layers: int = 1  # stacked recurrent (or transformer) layers
    dropout: float = 0.3
    num_heads: int = 4  # transformer attention heads
    segments: int = 4  # segments head: temporal segments whose masked means are classified
    bottleneck: int = 0  # feature heads: a learned Dense(bottleneck) + dropout before the head (0 = none)
    input_dropout: float = 0.0  # feature dropout: whole feature channels dropped for all steps of a clip
    pca: int = 0  # feature heads: project on the first `pca` whitened principal axes of the train frames
    frames: int = 0  # frames the head sees: 0 = every cached step; else a subset (jittered when training)
    pooled_steps: int = 0  # recurrent heads: read the masked means of this many temporal segments (0 = every frame)
    shortcut: int = 0  # recurrent heads: a frozen linear classifier of this many segment means (0 = no shortcut)
    l2: float = 0.0  # L2 penalty on the trained classifier's weights (added to the mean loss of each batch)

    def __post_init__(self) -> None:
        head = self.head.strip().lower() if isinstance(self.head, str) else self.head
        check_choice("head", head, HEAD_NAMES)
        object.__setattr__(self, "head", head)
        for name, low in (
            ("units", 1),
            ("layers", 1),
            ("num_heads", 1),
            ("segments", 1),
            ("bottleneck", 0),
            ("pca", 0),
            ("frames", 0),
            ("pooled_steps", 0),
            ("shortcut", 0),
        ):
            check_int(name, getattr(self, name), low)
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("dropout", "input_dropout"):
            dropout = getattr(self, name)
            if not isinstance(dropout, numbers.Real):  # check_float would read the string "0.3" as a number
                raise OptionError(name, f"must be a number, got {dropout!r}.")
            check_float(name, dropout, 0.0, 1.0, high_open=True)
            object.__setattr__(self, name, float(dropout))
        if isinstance(self.l2, bool) or not isinstance(self.l2, numbers.Real) or not (0.0 <= float(self.l2) <= 100.0):
            raise OptionError("l2", f"must be a number from 0 (no penalty) to 100; got {self.l2!r}.")
        object.__setattr__(self, "l2", float(self.l2))
        if self.bottleneck and self.pca:
            raise OptionError("pca", "and bottleneck exclude each other: choose a learned bottleneck or PCA.")

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict; ``HeadConfig.from_dict(c.to_dict()) == c``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HeadConfig":
        """Inverse of :meth:`to_dict`; missing keys take their defaults, unknown keys are refused."""
        if not isinstance(d, dict):
            raise FeatpipeError(f"A head config must be a mapping of {_field_names()}; got {type(d).__name__}.")
        unknown = sorted(set(d) - set(_field_names()))
        if unknown:
            raise FeatpipeError(
                f"Unknown head config key(s) {', '.join(map(str, unknown))}: allowed keys are "
                f"{', '.join(_field_names())}."
            )
        return cls(**d)


def _field_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(HeadConfig))
