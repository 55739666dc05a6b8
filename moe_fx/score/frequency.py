"""Frequency: how often the router picks an expert over the calibration tokens."""

from __future__ import annotations

from moe_fx.score.base import Scorer, register_scorer


@register_scorer
class FrequencyScorer(Scorer):
    name = "frequency"
    observers = ("routing",)
    needs = ("count",)

    def score_block(self, stats, block):
        return stats.get(block.path, "count")
