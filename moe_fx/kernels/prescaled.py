"""A routed forward for MoE blocks whose experts transformers runs densely on prescaled inputs (Llama 4).

Why: transformers' ``Llama4TextMoe`` multiplies each token by every expert's routing score (zero off its top-k)
and runs *all* experts on all of those rows (``[E * T, H]`` through two batched GEMMs), then sums: 16x the expert
work of Llama-4-Scout's top-1 routing, and every expert's weights read at every decode step. The experts are not
behind transformers' ``use_experts_implementation`` switch, so ``grouped_mm`` / ``moe_fx`` cannot replace them.

What: :func:`routed_forward` computes the same block from the routed (token, slot) pairs only: the router's top-k
(the router's own ``topk`` on its logits, so ties resolve the same), each pair's input ``score * x`` (the score
scales the expert's *input*, as in the stock block), the pairs through the ``moe_fx`` experts forward (grouped
GEMMs that read each routed expert once; :mod:`moe_fx.kernels.forward`) with weight 1, summed per token, plus the
shared expert. :func:`route_prescaled_blocks` installs it on every such block of a model (``moe_fx.compile``
does); :func:`restore_prescaled_blocks` puts the stock forward back. The checkpoint and the calibration hooks
(which read the dense call) are untouched: the swap is an instance attribute.
"""

from __future__ import annotations

import types
from collections.abc import Iterable

import torch
from torch import nn

from moe_fx.errors import UnsupportedFamilyError
from moe_fx.kernels.forward import moe_fx_experts_forward

__all__ = ["restore_prescaled_blocks", "route_prescaled_blocks", "routed_forward"]


class _ExpertsView:
    """Llama 4's experts module as the ``moe_fx`` experts forward reads an experts module: its live fused tensors
    (``gate_up_proj [E, H, 2I]`` gate half first, ``down_proj [E, I, H]``: transposed) and the flags transformers'
    decorator would give it."""

    has_gate, has_bias, is_transposed = True, False, True

    def __init__(self, experts: nn.Module) -> None:
        self._experts = experts
        self.act_fn = experts.act_fn

    @property
    def gate_up_proj(self) -> torch.Tensor:
        return self._experts.gate_up_proj

    @property
    def down_proj(self) -> torch.Tensor:
        return self._experts.down_proj


def routed_forward(block: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``Llama4TextMoe.forward`` on the routed pairs only (see module doc): ``(output [T, H], router logits)``."""
    hidden = hidden_states.reshape(-1, block.hidden_dim)
    scores, logits = block.router(hidden)
    top = torch.topk(logits, block.router.top_k, dim=1).indices
    rows = (hidden.unsqueeze(1) * scores.gather(1, top).unsqueeze(-1)).reshape(-1, hidden.shape[-1])
    ones = torch.ones(rows.shape[0], 1, dtype=hidden.dtype, device=hidden.device)
    routed = moe_fx_experts_forward(_ExpertsView(block.experts), rows, top.reshape(-1, 1), ones)
    out = block.shared_expert(hidden)
    out.add_(routed.view(*top.shape, -1).sum(dim=1))
    return out, logits


def _check_block(path: str, block: nn.Module) -> None:
    experts = getattr(block, "experts", None)
    parts = [getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)]
    if not all(isinstance(p, torch.Tensor) and p.ndim == 3 for p in parts) or not all(
        hasattr(block, a) for a in ("router", "shared_expert", "hidden_dim")
    ):
        raise UnsupportedFamilyError(f"{path} ({type(block).__name__}): the routed forward for prescaled experts is written for "
                                     "transformers' Llama4TextMoe (router, fused experts, shared expert)")


def route_prescaled_blocks(model: nn.Module, paths: Iterable[str]) -> int:
    """Run the blocks at ``paths`` (the spec's ``dense_prescaled`` blocks) through :func:`routed_forward`; return how many."""
    count = 0
    for path in paths:
        block = model.get_submodule(path)
        _check_block(path, block)
        block.forward = types.MethodType(routed_forward, block)
        count += 1
    return count


def restore_prescaled_blocks(model: nn.Module, paths: Iterable[str]) -> None:
    """Put the stock forward back on the blocks at ``paths`` that :func:`route_prescaled_blocks` changed."""
    for path in paths:
        block = model.get_submodule(path)
        if "forward" in vars(block):
            del block.forward
