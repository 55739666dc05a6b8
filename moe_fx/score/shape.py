"""SHAPE: task-driven Shapley expert pruning. An expert's score is its Shapley value in the coalitions the
router actually forms on calibration tokens.

Why: frequency and REAP credit an expert for the tokens routed to it, but not for what the block loses
without it; the router then re-routes to a substitute, which may do the job as well (redundant expert) or
not (irreplaceable one). The Shapley value measures exactly that, averaged fairly over the orders in which
experts could be removed. For each sampled token t the players are its candidate set C_t, the top-k'
experts by the router's selection score (k' = ``candidates``, default 2*top_k, clipped to [top_k, E];
k' = top_k is the routed coalition alone). The utility of a coalition S of C_t is ``v(S) = -||y_S - y_full||^2``, where ``y_full`` is
the block's routed output with all experts and ``y_S`` the output of a model holding only the experts in S,
whose router re-routes among them by the family's rule (:func:`moe_fx.model.routing.route_within`);
``v(∅) = -||y_full||^2``. Shapley values are estimated by Monte Carlo permutation sampling, vectorised over
tokens: ``permutations`` random orders of each C_t, seeded per block from the scorer's ``seed``. An expert's
score is the mean over sampled tokens of its Shapley value (0 on tokens whose candidate set lacks it);
per token the values sum to ``v(C_t) - v(∅)`` (efficiency). ``self.stderr[block.path]`` holds, after
scoring, each expert's standard error: the std of its marginal contribution over the (token, permutation)
samples divided by sqrt(their count).

Reads the ``samples`` observer (raw router logits and every expert's output on a seeded token sample), so
no model access is needed. Cost per block: time O(N·M·k'·(E + k·H)), inside O(N·M·k'·E·H), for N sampled
tokens, M permutations, E experts, top-k and hidden size H; memory is the samples observer's (N·E·H floats)
plus O(N·(E + k·H)) working tensors.
"""

from __future__ import annotations

import hashlib

import torch

from moe_fx.errors import BadOptionError
from moe_fx.model.routing import combine, route, route_within, selection_scores
from moe_fx.model.spec import RouterSpec
from moe_fx.score.base import register_scorer
from moe_fx.score.sample import SubsetScorer, routed_sample


def candidate_sets(router: RouterSpec, logits: torch.Tensor, selection_bias: torch.Tensor | None, candidates: int) -> torch.Tensor:
    """``[T, k']``: each token's top-``candidates`` experts by the router's selection score (clipped to E)."""
    return torch.topk(selection_scores(router, logits, selection_bias), min(candidates, logits.shape[-1]), dim=-1).indices


def utility(router, logits, expert_out, selection_bias, allowed: torch.Tensor, y_full: torch.Tensor) -> torch.Tensor:
    """``[T]`` float64: ``-||y_S - y_full||^2`` per token, S = the token's row of ``allowed [T, E]``.
    The empty coalition gives ``-||y_full||^2``."""
    y = combine(expert_out, *route_within(router, logits, selection_bias, allowed))
    return -((y.double() - y_full.double()) ** 2).sum(-1)


def shapley_samples(
    router, logits, expert_out, selection_bias, cand: torch.Tensor, permutations: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte Carlo permutation estimate of every token's Shapley values over its candidate set ``cand [T, k']``.

    Returns ``(phi, phi_sq)``, both ``[T, E]`` float64: per token and expert, the mean over the permutations of
    the expert's marginal contribution and of its square (0 for experts outside the token's candidate set).
    """
    t, e = logits.shape
    y_full = combine(expert_out, *route(router, logits, selection_bias))
    v_empty = -(y_full.double() ** 2).sum(-1)
    phi = torch.zeros(t, e, dtype=torch.float64)
    phi_sq = torch.zeros(t, e, dtype=torch.float64)
    rows = torch.arange(t)
    for _ in range(permutations):
        order = cand.gather(1, torch.rand(cand.shape, generator=generator).argsort(dim=-1))
        allowed = torch.zeros(t, e, dtype=torch.bool)
        v_prev = v_empty
        for j in range(cand.shape[1]):
            player = order[:, j]
            allowed[rows, player] = True
            v = utility(router, logits, expert_out, selection_bias, allowed, y_full)
            gain = v - v_prev
            phi[rows, player] += gain
            phi_sq[rows, player] += gain**2
            v_prev = v
    return phi / permutations, phi_sq / permutations


@register_scorer
class ShapeScorer(SubsetScorer):
    name = "shape"

    def __init__(self, seed: int = 0, permutations: int = 32, candidates: int | None = None) -> None:
        super().__init__(seed)
        if permutations < 1:
            raise BadOptionError(f"shape: permutations must be at least 1, got {permutations}")
        if candidates is not None and candidates < 1:
            raise BadOptionError(f"shape: candidates must be at least 1, got {candidates}")
        self.permutations, self.candidates = permutations, candidates
        self.stderr: dict[str, torch.Tensor] = {}
        """Per block path, after scoring: each expert's standard error ``[E]`` (float64)."""

    def score_block(self, stats, block):
        sample = routed_sample(stats, block, "coalitions of experts")
        logits, expert_out, bias, n = sample.logits, sample.expert_out, sample.bias, sample.logits.shape[0]
        e = block.num_experts
        if n == 0:
            self.stderr[block.path] = torch.zeros(e, dtype=torch.float64)
            return torch.zeros(e, dtype=torch.float64)
        k_cand = max(block.top_k, self.candidates if self.candidates is not None else 2 * block.top_k)
        cand = candidate_sets(block.router, logits, bias, k_cand)
        digest = hashlib.sha256(f"{self.seed}:{block.path}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        phi, phi_sq = shapley_samples(block.router, logits, expert_out, bias, cand, self.permutations, gen)
        scores = phi.mean(0)
        count = n * self.permutations
        var = (self.permutations * phi_sq.sum(0) - count * scores**2).clamp(min=0) / max(count - 1, 1)
        self.stderr[block.path] = var.sqrt() / count**0.5
        return scores
