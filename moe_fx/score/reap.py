"""REAP (router-weighted expert activation pruning): the mean, over the tokens routed to an expert, of its
routing weight times the L2 norm of its output. The weight is the one the experts call receives, i.e. the
renormalised top-k weight for families that renormalise (as the reference implementation does). An expert
no calibration token reached scores 0."""

from __future__ import annotations

import torch

from moe_fx.score.base import Scorer, register_scorer


@register_scorer
class ReapScorer(Scorer):
    name = "reap"
    observers = ("routing", "reap")
    needs = ("reap_sum", "count")

    def score_block(self, stats, block):
        count = stats.get(block.path, "count")
        return torch.where(count > 0, stats.get(block.path, "reap_sum") / count.clamp(min=1), torch.zeros_like(count))
