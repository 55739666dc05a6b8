"""The scorer interface and registry: :class:`Scorer` (statistics in, one score per expert or channel out),
:class:`Scores`, and :func:`register_scorer` / :func:`get_scorer` by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from moe_fx.calibrate.stats import CalibrationStats
from moe_fx.errors import BadOptionError
from moe_fx.model.spec import MoEBlockSpec, MoEModelSpec


@dataclass
class Scores:
    """Per block path, float64 importances and the method that made them: ``[E]`` per expert
    (``granularity="expert"``) or ``[E, I]`` per intermediate channel (``"channel"``)."""

    method: str
    per_block: dict[str, torch.Tensor] = field(default_factory=dict)
    granularity: str = "expert"
    per_expert: dict[str, torch.Tensor] | None = None
    """Channel scorers only: an ``[E]`` expert score beside the channel scores (coverage allocation reads it)."""
    comparable_across_blocks: bool = False
    """Whether raw scores of different blocks are on one scale (loss estimates), so rankings across blocks
    may use them as they are; otherwise allocations normalise each block first."""

    def to_dict(self) -> dict:
        if self.granularity == "channel":  # E x I numbers per block are too many for a record: per-expert totals
            totals = self.per_expert or {k: v.sum(1) for k, v in self.per_block.items()}
            return {"method": self.method, "granularity": "channel", "per_expert": {k: [round(float(x), 8) for x in v] for k, v in totals.items()}}
        return {"method": self.method, "per_block": {k: [round(float(x), 8) for x in v] for k, v in self.per_block.items()}}


class Scorer:
    """Base scorer. ``needs``: statistic names it reads (empty for data-free scorers)."""

    name = "scorer"
    needs: tuple[str, ...] = ()
    observers: tuple[str, ...] = ()
    """Calibrate observers that record ``needs`` (the CLI adds them to its calibration)."""
    granularity = "expert"
    """``expert``: ``score_block`` returns ``[E]``; ``channel``: ``[E, I]`` (one score per intermediate neuron)."""
    comparable_across_blocks = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.model: nn.Module | None = None
        self.positions: Positions = same_experts

    def check(self, spec: MoEModelSpec) -> None:
        """Refuse blocks this scorer cannot score whatever the data (a routing rule it cannot simulate, ...):
        called by :class:`~moe_fx.passes.Score` before any pass runs, so the refusal comes before calibration."""

    def score_block(self, stats: CalibrationStats | None, block: MoEBlockSpec) -> torch.Tensor:
        raise NotImplementedError

    def expert_block(self, stats: CalibrationStats | None, block: MoEBlockSpec) -> torch.Tensor | None:
        """Channel scorers: an ``[E]`` expert score to keep beside the channel scores (None: none)."""
        return None

    def __call__(self, stats: CalibrationStats | None, spec: MoEModelSpec, model: nn.Module | None = None,
                 positions: Positions | None = None) -> Scores:
        """Score every block; ``model``: for scorers that read weights (``self.model`` while scoring); ``positions``:
        where the block's current experts are among those a statistic was recorded on (``self.positions``, for
        scorers that score the current experts from statistics recorded before a drop; default: the same experts)."""
        self.model, self.positions = model, positions or same_experts
        if self.needs and stats is None:
            raise BadOptionError(f"scorer {self.name!r} needs calibration statistics {self.needs}: run Calibrate first")
        missing = sorted({n for b in spec.blocks for n in self.needs if n not in stats.per_block.get(b.path, {})}) if self.needs else []
        if missing:
            raise BadOptionError(
                f"scorer {self.name!r} needs statistics {missing}: calibrate with observers {self.observers}, "
                f"e.g. Calibrate(data, observers={self.observers!r})"
            )
        per_block = {b.path: self.score_block(stats, b).double().cpu() for b in spec.blocks}
        per_expert = {b.path: e.double().cpu() for b in spec.blocks if (e := self.expert_block(stats, b)) is not None} or None
        return Scores(self.name, per_block, self.granularity, per_expert, self.comparable_across_blocks)


Positions = Callable[[MoEBlockSpec, int], "torch.Tensor | None"]
"""``(block, recorded experts) -> positions of the block's experts among them`` (None: the same experts), as
:meth:`~moe_fx.pipeline.MoEState.recorded_positions` answers."""


def same_experts(block: MoEBlockSpec, recorded: int) -> None:
    """:data:`Positions` where no plan maps dropped experts: the statistics must cover the block's experts."""
    if recorded != block.num_experts:
        raise BadOptionError(f"{block.path}: statistics cover {recorded} experts and the block has {block.num_experts}; "
                             "score through Score, which maps them with the pruning plan, or calibrate again")


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
