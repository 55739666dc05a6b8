"""NAEE-style layer-wise expert selection (Lu et al., 2024, "Not All Experts are Equal").

Keep the experts whose subset best *reconstructs the block's routed output* on calibration tokens, with
the router re-routing among the kept experts exactly as the pruned model will (``moe_fx.routing``).
Enumerating all C(E, n) subsets is infeasible beyond small E, so this runs greedy backward elimination:
repeatedly drop the expert whose removal raises the mean squared reconstruction error least. An expert's
score is the step at which it is eliminated (later = more important), so the top-n experts by score are
the greedy kept set of size n, for every budget n. Reads the ``samples`` observer: a seeded token sample
per block with raw router logits and every expert's output, so the search needs no model access.
"""

from __future__ import annotations

import torch

from ...routing import combine, route
from . import Scorer, register_scorer
from .sample import SAMPLE_NEEDS, routed_sample


def reconstruction_error(router, logits, expert_out, bias, kept: torch.Tensor, target: torch.Tensor) -> float:
    """Mean squared error between the block output with only ``kept`` experts and ``target``."""
    idx, weights = route(router, logits, bias, kept)
    return float(((combine(expert_out, kept[idx], weights) - target) ** 2).sum(-1).mean())


@register_scorer
class NaeeScorer(Scorer):
    name = "naee"
    observers = ("routing", "samples")
    needs = SAMPLE_NEEDS

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
        return scores
