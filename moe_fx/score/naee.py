"""NAEE-style layer-wise expert selection (Lu et al., 2024, "Not All Experts are Equal").

Keep the experts whose subset best *reconstructs the block's routed output* on calibration tokens, with
the router re-routing among the kept experts exactly as the pruned model will (``moe_fx.model.routing``).
Given the budget (``keep``) and at most ``max_subsets`` subsets C(E, keep), every subset of that size is
evaluated and the best one wins (exhaustive). Otherwise, greedy backward elimination: repeatedly drop the
expert whose removal raises the mean squared reconstruction error least. An expert's score is the step at
which it is eliminated (later = more important), so the top-n experts by score are the greedy kept set of
size n, for every budget n; with the exhaustive search, the best subset's experts are lifted above all
others, so the top-``keep`` are exactly that subset. Reads the ``samples`` observer: a seeded token sample
per block with raw router logits and every expert's output, so the search needs no model access.
"""

from __future__ import annotations

import itertools
import math

import torch

from moe_fx.model.routing import combine, route
from moe_fx.score.base import register_scorer
from moe_fx.score.sample import SubsetScorer, routed_sample


def reconstruction_error(router, logits, expert_out, bias, kept: torch.Tensor, target: torch.Tensor) -> float:
    """Mean squared error between the block output with only ``kept`` experts and ``target``."""
    idx, weights = route(router, logits, bias, kept)
    return float(((combine(expert_out, kept[idx], weights) - target) ** 2).sum(-1).mean())


@register_scorer
class NaeeScorer(SubsetScorer):
    """``keep``: experts each block will keep (enables the exhaustive search); ``max_subsets``: its limit."""

    name = "naee"

    def __init__(self, seed: int = 0, keep: int | None = None, max_subsets: int = 5000) -> None:
        super().__init__(seed)
        self.keep, self.max_subsets = keep, max_subsets
        self.exhaustive: dict[str, bool] = {}
        """Per block path, after scoring: whether the kept set was found by enumeration."""

    def score_block(self, stats, block):
        sample = routed_sample(stats, block, "subsets of experts")
        logits, expert_out, bias = sample.logits, sample.expert_out, sample.bias
        target = combine(expert_out, *route(block.router, logits, bias))
        alive = list(range(block.num_experts))
        scores = torch.zeros(block.num_experts, dtype=torch.float64)
        step = 0
        while len(alive) > block.top_k:
            errors = [
                (reconstruction_error(block.router, logits, expert_out, bias, torch.tensor([a for a in alive if a != e]), target), e)
                for e in alive
            ]
            _, drop = min(errors)
            scores[drop] = step
            alive.remove(drop)
            step += 1
        scores[alive] = step
        n = self.keep
        self.exhaustive[block.path] = n is not None and block.top_k <= n < block.num_experts and math.comb(block.num_experts, n) <= self.max_subsets
        if self.exhaustive[block.path]:
            subsets = [torch.tensor(c) for c in itertools.combinations(range(block.num_experts), n)]
            best = min(subsets, key=lambda kept: reconstruction_error(block.router, logits, expert_out, bias, kept, target))
            scores[best] += block.num_experts
        return scores
