"""The hyper-parameters of one classifier head (no Keras import: run.json readers and options use it)."""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, fields

from featpipe.errors import FeatpipeError
from featpipe.names import HEAD_NAMES


@dataclass(frozen=True)
class HeadConfig:
    """Hyper-parameters of one classifier head. Validated on construction."""

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
        if not isinstance(self.head, str):
            raise FeatpipeError(f"Head must be a name, one of {', '.join(HEAD_NAMES)}; got {self.head!r}.")
        head = self.head.strip().lower()
        if head not in HEAD_NAMES:
            raise FeatpipeError(f"Unknown head {self.head!r}: choose one of {', '.join(HEAD_NAMES)}.")
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
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise FeatpipeError(f"{name} must be a whole number >= {low}; got {value!r}.")
            if value < low:
                raise FeatpipeError(f"{name} must be >= {low}; got {value}.")
            object.__setattr__(self, name, int(value))
        for name in ("dropout", "input_dropout"):
            dropout = getattr(self, name)
            if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
                raise FeatpipeError(f"{name} must be a number in [0, 1); got {dropout!r}.")
            if not (0.0 <= float(dropout) < 1.0):  # also rejects NaN
                raise FeatpipeError(f"{name} must be in [0, 1) (a fraction of units dropped); got {dropout}.")
            object.__setattr__(self, name, float(dropout))
        if isinstance(self.l2, bool) or not isinstance(self.l2, numbers.Real) or not (0.0 <= float(self.l2) <= 100.0):
            raise FeatpipeError(f"l2 must be a number from 0 (no penalty) to 100; got {self.l2!r}.")
        object.__setattr__(self, "l2", float(self.l2))
        if self.bottleneck and self.pca:
            raise FeatpipeError("Choose a learned bottleneck or a PCA projection, not both.")

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
