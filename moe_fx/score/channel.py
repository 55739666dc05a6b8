"""Channel scorers: one score per intermediate channel (neuron) of every routed expert, ``[E, I]`` per block.

- ``activation``: mean ``|a|`` over the tokens routed to the expert (the activation-magnitude baseline).
- ``weight``: ``||gate/up rows of j|| * ||down column j||`` (weight-norm baseline; no calibration data).
- ``fisher`` (Fisher-MoE): ``sum_t (a_tj g_tj)^2`` over routed tokens, the Fisher information of a per-channel
  mask (``g``: the loss gradient at the channel's activation, routing weight included). An estimate of the
  loss increase of removing the channel, so it compares across blocks.
- ``heapr`` (HEAPr, Li et al. 2025): atomic expert ``j`` (one channel) scored by the second-order loss change
  of removing it with the Hessian in the block's output space approximated by the routing-weighted gradient
  covariance ``M_e``: ``mean_t a_tj^2 * d_j^T M_e d_j`` (``d_j``: down column), which equals
  ``mean a^2 * mean g^2`` per channel, so no ``H x H`` matrix is ever formed. Means over the expert's routed
  tokens, as in the reference code (``reduce="sum"`` weighs by the token count instead).
- ``coverage`` (Ding et al. 2026): channel score ``(||A_j|| + ||U_j|| + ||Z_j||) / 3`` (L2 norms over routed
  tokens of the activation, up and gate projections) and, per expert, the attribution share of the block's
  routed output; meant for ``PruneChannels(allocation="coverage")``.
"""

from __future__ import annotations

import torch

from moe_fx.errors import BadOptionError
from moe_fx.model.expert_weights import neuron_features, neuron_tensors
from moe_fx.score.base import Scorer, register_scorer


def _per_token(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``total [E, I]`` divided by each expert's routed-token count; 0 for experts no token reached."""
    return torch.where(count[:, None] > 0, total / count.clamp(min=1)[:, None], torch.zeros_like(total))


class ChannelScorer(Scorer):
    granularity = "channel"


@register_scorer
class ActivationScorer(ChannelScorer):
    name = "activation"
    observers = ("channels",)
    needs = ("chan_abs_sum", "chan_count")

    def score_block(self, stats, block):
        return _per_token(stats.get(block.path, "chan_abs_sum"), stats.get(block.path, "chan_count"))


@register_scorer
class WeightNormScorer(ChannelScorer):
    name = "weight"

    def score_block(self, stats, block):
        if self.model is None:
            raise BadOptionError("the weight scorer reads the experts' weights: call it with the model (Score does)")
        tensors, _ = neuron_tensors(self.model, block.experts)
        proj = [nt for nt in tensors if nt.name != block.experts.down and not nt.name.endswith("_bias")]
        down = [nt for nt in tensors if nt.name == block.experts.down]
        return torch.stack([
            neuron_features(self.model, proj, e).norm(dim=1).double() * neuron_features(self.model, down, e).norm(dim=1).double()
            for e in range(block.num_experts)
        ])


@register_scorer
class FisherScorer(ChannelScorer):
    name = "fisher"
    observers = ("channel_grads",)
    needs = ("chan_fisher",)
    comparable_across_blocks = True

    def score_block(self, stats, block):
        return stats.get(block.path, "chan_fisher").clone()


@register_scorer
class HeaprScorer(ChannelScorer):
    name = "heapr"
    observers = ("channels", "channel_grads")
    needs = ("chan_act_sq", "chan_grad_sq", "chan_count")
    comparable_across_blocks = True

    def __init__(self, seed: int = 0, reduce: str = "mean") -> None:
        super().__init__(seed)
        if reduce not in ("mean", "sum"):
            raise BadOptionError(f"heapr reduce must be 'mean' (reference) or 'sum', got {reduce!r}")
        self.reduce = reduce

    def score_block(self, stats, block):
        count = stats.get(block.path, "chan_count")
        score = _per_token(stats.get(block.path, "chan_act_sq"), count) * _per_token(stats.get(block.path, "chan_grad_sq"), count)
        return score * count[:, None] if self.reduce == "sum" else score


@register_scorer
class CoverageScorer(ChannelScorer):
    name = "coverage"
    observers = ("channels",)
    needs = ("chan_act_sq", "chan_up_sq", "chan_gate_sq", "expert_attribution")

    def score_block(self, stats, block):
        norms = [stats.get(block.path, k).clamp(min=0).sqrt() for k in ("chan_act_sq", "chan_up_sq", "chan_gate_sq")]
        if block.experts.gate_up is None:  # non-gated experts have no gate projection
            norms = norms[:2]
        return sum(norms) / len(norms)

    def expert_block(self, stats, block):
        return stats.get(block.path, "expert_attribution").clamp(min=0)
