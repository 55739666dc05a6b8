"""Scorers: calibration statistics in, one importance score per expert out (higher = keep).

Every scorer is a class registered by name with :func:`register_scorer`; it declares the statistics it
reads so a missing observer is reported before any work. New method = one file in this package.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...errors import BadOptionError
from ...spec import MoEBlockSpec, MoEModelSpec
from ...stats import CalibrationStats


@dataclass
class Scores:
    """Per block path, a float64 tensor ``[E]`` of expert importances, and the method that made them."""

    method: str
    per_block: dict[str, torch.Tensor] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"method": self.method, "per_block": {k: [round(float(x), 8) for x in v] for k, v in self.per_block.items()}}


class Scorer:
    """Base scorer. ``needs``: statistic names it reads (empty for data-free scorers)."""

    name = "scorer"
    needs: tuple[str, ...] = ()
    observers: tuple[str, ...] = ()
    """Calibrate observers that record ``needs`` (the CLI adds them to its calibration)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def score_block(self, stats: CalibrationStats | None, block: MoEBlockSpec) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, stats: CalibrationStats | None, spec: MoEModelSpec) -> Scores:
        if self.needs and stats is None:
            raise BadOptionError(f"scorer {self.name!r} needs calibration statistics {self.needs}: run Calibrate first")
        missing = sorted({n for b in spec.blocks for n in self.needs if n not in stats.per_block.get(b.path, {})}) if self.needs else []
        if missing:
            raise BadOptionError(
                f"scorer {self.name!r} needs statistics {missing}: calibrate with observers {self.observers}, "
                f"e.g. Calibrate(data, observers={self.observers!r})"
            )
        return Scores(self.name, {b.path: self.score_block(stats, b).double() for b in spec.blocks})


SCORERS: dict[str, type[Scorer]] = {}


def register_scorer(cls: type[Scorer]) -> type[Scorer]:
    if cls.name in SCORERS:
        raise ValueError(f"a scorer named {cls.name!r} is already registered")
    SCORERS[cls.name] = cls
    return cls


def get_scorer(name: str, **kwargs) -> Scorer:
    if name not in SCORERS:
        raise BadOptionError(f"unknown scoring method {name!r}; available: {', '.join(sorted(SCORERS))}")
    try:
        return SCORERS[name](**kwargs)
    except TypeError as exc:  # an option this scorer does not take
        raise BadOptionError(f"scorer {name!r}: {exc}") from None


from . import frequency, naee, random, reap, shape  # noqa: F401  (register the built-in scorers)
