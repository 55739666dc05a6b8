"""``obs`` channel scorer: greedy Optimal Brain Surgeon on each expert's own output, gradient-free and layer-local.

What: for expert ``e`` of a block, ``A`` holds its routing-weighted intermediate activations on the sampled tokens
routed to it (``w_t * a_t``, the ``inputs`` observer's sample re-routed among the current experts) and ``D`` its
down projection (``D^T [I, H]``). Removing channel ``j`` and re-solving the other channels' down columns for the
least-squares error ``||A (D'^T - D^T)||^2`` costs ``||D_j||^2 / [G^-1]_jj`` with ``G = A^T A`` (damped by
``damp`` x its mean diagonal), and the optimal update is ``D^T -= G^-1[:, j] D_j / [G^-1]_jj`` (structured OBS:
ZipLM, SlimGPT). Channels are removed greedily, cheapest first, updating ``G^-1`` and the weights after each;
a channel's score is the running maximum of the costs up to its removal (nudged to increase strictly), divided by the block's output energy on
the sample, so every expert's channels are ordered by when OBS would remove them and scores compare across the
experts of a block (a marginal error in the same output space).

Why: channel scorers that read only activations (``activation``, ``coverage``) ignore that the kept channels can
take over part of a removed one's output, which :class:`~moe_fx.passes.CompensateExperts` then refits; Fisher and
HEAPr account for the loss but need the whole model's gradient, so they cannot stream. OBS ranks channels by the
error that is left *after* the refit, from forward statistics of one layer. On qwen3moe-bench (uniform widths,
then compensation) it loses +0.114 / +0.350 NLL at 25% / 50% of the routed parameters removed, against Fisher's
+0.108 / +0.335 and activation's +0.130 / +0.417 (``docs/methods/channels.md``).

Cost: per block one ``[I, I]`` Gram matrix and inverse per expert and ``I`` low-rank updates of two ``[I, I]``
matrices (the inverse and ``D^T D``, which stands for the ``[I, H]`` weights: ``||D_j||^2`` is its diagonal), in
float64 on the weights' device, experts batched (about 80 s a layer of 128 experts of width 768 on one CPU
thread); the sample is the one compensation reads (``samples x (2H + E + 2k)`` floats a block).

Limits: the error is block-local (no loss weighting); the experts must compute ``down(gating(gate, up))``
(:class:`~moe_fx.model.expert_math.ExpertMath`) with the routing weight outside the expert (Llama 4's prescaled
experts are refused, as for the other channel scorers); after a drop, the routing rule must be one
:func:`~moe_fx.model.routing.route` re-applies.
"""

from __future__ import annotations

import torch

from moe_fx.errors import BadOptionError, UnsupportedFamilyError
from moe_fx.model.expert_math import ExpertMath
from moe_fx.model.spec import MoEBlockSpec, MoEModelSpec
from moe_fx.model.tensors import get_tensor
from moe_fx.score.base import register_scorer
from moe_fx.score.channel import ChannelScorer
from moe_fx.score.sample import INPUT_NEEDS, inputs_sample, rerouted

_CHUNK_BYTES = 1 << 28
"""Experts eliminated together: their two ``[I, I]`` float64 matrices take at most this many bytes (256 MiB)."""


@torch.no_grad()
def obs_elimination(grams: torch.Tensor, gram_w: torch.Tensor, damp: float) -> torch.Tensor:
    """``[E, I]`` costs of greedy structured OBS, per expert: the running maximum of ``||D_j||^2 / [G^-1]_jj`` at
    each channel's removal (see the module doc), nudged to increase strictly (ties would fall back to channel ids).
    ``grams``: ``G = A^T A`` ``[E, I, I]``; ``gram_w``: ``D^T D`` ``[E, I, I]`` (``D^T [I, H]`` the down projection,
    neurons as rows); both float64. Each step is two batched rank-two/rank-one updates in place (no ``[E, I, I]``
    temporaries): 2.5 s for 4 experts of width 768 on one CPU thread."""
    n_exp, width, _ = grams.shape
    eye = torch.eye(width, dtype=grams.dtype, device=grams.device)
    scale = grams.diagonal(dim1=1, dim2=2).mean(1).clamp(min=1e-30)
    inv = torch.linalg.inv(grams + damp * scale[:, None, None] * eye)
    gram_w = gram_w.clone()
    rows = torch.arange(n_exp, device=grams.device)
    alive = torch.ones(n_exp, width, dtype=torch.bool, device=grams.device)
    running = torch.zeros(n_exp, dtype=grams.dtype, device=grams.device)
    costs = torch.zeros(n_exp, width, dtype=grams.dtype, device=grams.device)
    for _ in range(width):
        cost = (gram_w.diagonal(dim1=1, dim2=2) / inv.diagonal(dim1=1, dim2=2)).masked_fill(~alive, float("inf"))
        j = cost.argmin(1)
        running = torch.maximum(running * (1 + 2**-40), cost[rows, j])
        costs[rows, j] = running
        inv_j, w_j = inv[rows, :, j, None], gram_w[rows, :, j, None]  # [E, I, 1] columns (both matrices are symmetric)
        gain = inv_j / inv[rows, j, j][:, None, None]  # D^T -= gain D_j: the other channels take over channel j
        # D^T D -= gain v^T + v gain^T with v = (D^T D)[:, j] - gain ||D_j||^2 / 2
        v = w_j - 0.5 * gain * gram_w[rows, j, j][:, None, None]
        gram_w.baddbmm_(torch.cat([gain, v], 2), torch.cat([v, gain], 2).transpose(1, 2), alpha=-1)
        inv.baddbmm_(gain, inv_j.transpose(1, 2), alpha=-1)
        alive[rows, j] = False
        inv[rows, j, j], gram_w[rows, j, j] = 1.0, 0.0  # removed: keeps the division finite, masked anyway
    return costs


@register_scorer
class ObsScorer(ChannelScorer):
    """Channel importance by greedy structured OBS on each expert's output (see the module doc); ``damp``: the
    Gram matrix's damping relative to its mean diagonal (0.01: it beat 0.1 in 3 of 4 settings on held-out train
    windows of qwen3moe-bench, ``benchmarks/results/compensation_ridge_obs_cpu.json``)."""

    name = "obs"
    observers = ("inputs",)
    needs = INPUT_NEEDS

    def __init__(self, seed: int = 0, damp: float = 0.01) -> None:
        super().__init__(seed)
        if not damp > 0:
            raise BadOptionError(f"obs damp must be > 0 (relative to the Gram matrix's mean diagonal), got {damp}")
        self.damp = damp

    def check(self, spec: MoEModelSpec) -> None:
        for block in spec.blocks:
            if block.experts.call_style == "dense_prescaled":
                raise UnsupportedFamilyError(
                    f"{block.path}: its experts scale their input by the routing weight (Llama 4), which the obs channel "
                    "scorer does not model; use --granularity expert"
                )

    def score_block(self, stats, block: MoEBlockSpec) -> torch.Tensor:
        if self.model is None:
            raise BadOptionError("the obs scorer reads the experts' weights: call it with the model (Score does)")
        sample = inputs_sample(stats, block)
        kept = self.positions(block, sample["input_logits"].shape[1])
        math = ExpertMath(self.model, block.experts)
        device = get_tensor(self.model, block.experts.down).device
        x = sample["input_hidden"].to(device, torch.float64)
        idx, w = (t.to(device) for t in rerouted(block, sample, kept, "the obs channel scorer"))
        width = block.experts.intermediate_size
        energy = max(float((sample["input_target"].double() ** 2).sum()), 1e-30)
        chunk = max(1, _CHUNK_BYTES // (2 * width * width * 8))
        scores = []
        for start in range(0, block.num_experts, chunk):
            experts = range(start, min(start + chunk, block.num_experts))
            grams = torch.zeros(len(experts), width, width, dtype=torch.float64, device=device)
            gram_w = torch.zeros_like(grams)
            for i, e in enumerate(experts):
                dt = math.down(e, x)
                gram_w[i] = dt @ dt.T
                t, s = (idx == e).nonzero(as_tuple=True)
                if len(t):
                    a = w[t, s, None].double() * math.activations(e, x[t])
                    grams[i] = a.T @ a
            scores.append(obs_elimination(grams, gram_w, self.damp) / energy)
        return torch.cat(scores)
