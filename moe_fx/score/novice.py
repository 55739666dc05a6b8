"""MoNE's novices (arXiv 2507.00390): the constant that best stands in for each expert, and what it costs.

MoNE keeps the router whole and replaces a pruned expert by a constant vector: a token routed to expert ``e`` with
weight ``w`` gets ``w * c_e`` instead of ``w * expert_e(x)``. On the ``inputs`` observer's sampled tokens (the
experts' input with the routing the model applied; 16,384 a block by default), each expert is run on the tokens
routed to it; the least-squares constant is the routing-weighted mean ``c_e = sum_t w_t^2 y_t / sum_t w_t^2`` of its
outputs, and replacing ``e`` adds the substitution error ``sum_t w_t^2 ||y_t - c_e||^2 / N`` to the block's squared
output error (``N`` sampled tokens). That error is low for experts that are rarely routed, lightly weighted or nearly
constant: MoNE's criterion (frequency times output variance). The ``mone`` scorer ranks experts by it;
:class:`~moe_fx.passes.SubstituteExperts` writes the constants.

The ``inputs`` sample rather than the ``samples`` observer's (every expert's output on each sampled token): the
latter holds ``E`` outputs a token, so it keeps 16x fewer tokens in the same memory, and on qwen3moe-bench its
1,024 tokens chose and fitted worse constants (+0.240 / +0.806 at 25% / 50% against +0.201 / +0.734 on 16,384).
"""

from __future__ import annotations

import torch
from torch import nn

from moe_fx.calibrate.stats import CalibrationStats
from moe_fx.errors import BadOptionError
from moe_fx.kernels.experts_module import post_norm
from moe_fx.model.expert_math import ExpertMath
from moe_fx.model.spec import MoEBlockSpec
from moe_fx.model.tensors import get_tensor
from moe_fx.score.base import Scorer, register_scorer
from moe_fx.score.sample import INPUT_NEEDS, inputs_sample, routes_by_expert

MEAN_TOKENS = 256
"""Sampled tokens an expert no sampled token was routed to is averaged over (its constant, at no recorded cost)."""


@torch.no_grad()
def novice_fit(model: nn.Module, stats: CalibrationStats, block: MoEBlockSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(constants [E, H], error [E])`` in float64 on the CPU for ``block``'s experts, from their outputs on the
    sampled tokens routed to them. An expert no sampled token was routed to gets its plain mean output over the
    first :data:`MEAN_TOKENS` sampled tokens and an error of 0."""
    sample = inputs_sample(stats, block)
    if sample["input_logits"].shape[1] != block.num_experts:
        raise BadOptionError(f"{block.path}: the sample was routed over {sample['input_logits'].shape[1]} experts and the block has "
                             f"{block.num_experts}; substitute experts before any other expert rewrite, on statistics of the unpruned model")
    math, module = ExpertMath(model, block.experts), model.get_submodule(block.experts.path)
    device = get_tensor(model, block.experts.down).device
    x = sample["input_hidden"].to(device, torch.float64)
    idx, w = sample["input_topk_index"].to(device), sample["input_topk_weight"].to(device, torch.float64)
    output = lambda e, rows: post_norm(module, math.output(e, rows)).double()
    constants = torch.zeros(block.num_experts, block.experts.hidden_size, dtype=torch.float64, device=device)
    error = torch.zeros(block.num_experts, dtype=torch.float64, device=device)
    routes = routes_by_expert(idx, block.num_experts)
    for e in range(block.num_experts):
        t, s = routes.get(e, (None, None))
        w2 = w[t, s, None] ** 2 if t is not None else None
        if w2 is None or float(w2.sum()) <= 0:
            constants[e] = output(e, x[:MEAN_TOKENS]).mean(0) if len(x) else 0
            continue
        y = output(e, x[t])
        constants[e] = (w2 * y).sum(0) / w2.sum()
        error[e] = (w2 * (y - constants[e]) ** 2).sum() / len(x)
    return constants.cpu(), error.cpu()


@register_scorer
class MoNEScorer(Scorer):
    """Each expert's substitution error (:func:`novice_fit`): the experts cheapest to replace by a constant score lowest."""

    name = "mone"
    observers = ("routing", "inputs")
    needs = INPUT_NEEDS
    comparable_across_blocks = False

    def score_block(self, stats, block):
        if self.model is None:
            raise BadOptionError("scorer 'mone' runs the experts on the sampled tokens: pass the model (Score('mone') does)")
        return novice_fit(self.model, stats, block)[1]
