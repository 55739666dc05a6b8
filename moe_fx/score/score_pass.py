"""Score: run a registered scorer on the calibration statistics and store the expert scores."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moe_fx.model.spec import MoEModelSpec
from moe_fx.pipeline import MoEState, Pass, PassResult, require
from moe_fx.score.base import get_scorer


@dataclass
class Score(Pass):
    """Score experts with ``method`` (``random``, ``frequency``, ``reap``, ...); ``options``: the scorer's own
    keyword options (e.g. ``{"keep": 6}`` for NAEE's exhaustive search, ``{"permutations": 64}`` for SHAPE)."""

    method: str = "reap"
    seed: int = 0
    options: dict | None = None
    name = "score"

    def requires(self, state: MoEState) -> None:
        scorer = get_scorer(self.method, seed=self.seed, **(self.options or {}))
        require(not scorer.needs or state.stats is not None, f"Score({self.method!r})", "calibration statistics", "Calibrate(...)")

    def check_model(self, model: nn.Module, spec: MoEModelSpec) -> None:
        get_scorer(self.method, seed=self.seed, **(self.options or {})).check(spec)

    def check_layerwise(self) -> None:
        """Scorers score each block from its own statistics (and weights): layer-local. Statistics that need a
        backward pass of the whole model are refused where calibration is streamed."""

    def run(self, model: nn.Module, state: MoEState) -> PassResult:
        scores = get_scorer(self.method, seed=self.seed, **(self.options or {}))(state.stats, state.spec, model, state.recorded_positions)
        # statistics recorded before experts were dropped cover the original experts: keep the current ones' rows
        for table in (scores.per_block, scores.per_expert or {}):
            for block in (b for b in state.spec.blocks if b.path in table):
                pos = state.recorded_positions(block, table[block.path].shape[0])
                if pos is not None:
                    table[block.path] = table[block.path][pos]
        state.scores = scores
        return PassResult(model, False, {"method": self.method, "granularity": scores.granularity})
