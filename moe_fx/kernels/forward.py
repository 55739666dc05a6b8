"""The ``moe_fx`` experts forward: routed (token, slot) pairs sorted by expert, two grouped GEMMs, combine.

It computes what transformers' ``eager`` loop computes, for every family the ``use_experts_implementation``
decorator describes (:mod:`.layout`), with shapes that depend only on the number of tokens: no host sync, no
data-dependent shape, so it compiles with ``fullgraph=True`` and replays in CUDA graphs. The two matmuls are
``moe_fx::grouped_mm`` (:mod:`.grouped_mm`), which reads each routed expert's weights once; memory is
``O(tokens x top-k x width)``, never ``O(tokens x top-k x expert size)``. Under ``torch.export`` (ONNX), and
where no grouped kernel exists, :mod:`.distinct_forward` runs instead.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_fx.kernels import distinct_forward, grouped_mm, quantized_ops, routed_gemv
from moe_fx.kernels import experts_module as layout
from moe_fx.kernels.quantized import QuantizedWeight


def moe_fx_experts_forward(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`` (the experts call)."""
    layout.check_supported(experts)
    up, _ = layout.up_projection(experts)
    quantized = isinstance(up, QuantizedWeight)
    if _exporting() or not (quantized_ops.runs(up) if quantized else grouped_mm.supported(up.device, up.dtype)):
        return distinct_forward.distinct_experts_forward(experts, hidden_states, top_k_index, top_k_weights)
    top_k = top_k_index.shape[-1]
    num_experts = up.shape[0]
    expert_ids = top_k_index.reshape(-1)
    if routed_gemv.applies(expert_ids.shape[0], num_experts, up.device, quantized and quantized_ops.converts_8bit_codes(up)):
        return _decode(experts, hidden_states, expert_ids, top_k_weights)
    sorted_ids, perm = torch.sort(expert_ids)
    # rows up to and including each expert: a fixed-length search (bincount would sync to size its output)
    offsets = torch.searchsorted(sorted_ids, torch.arange(num_experts, device=sorted_ids.device), right=True).to(torch.int32)

    src = perm // top_k  # the token of each sorted row

    def grouped(x: torch.Tensor, weight: layout.Weight, first: bool) -> torch.Tensor:
        if isinstance(weight, QuantizedWeight):
            return quantized_ops.grouped(x, weight, offsets, src if first else None)
        return grouped_mm.grouped_matmul(x, weight, offsets, experts.is_transposed)

    # the quantized kernels read each token's hidden state in place (and quantize each token once, not its top-k copies)
    out = layout.expert_mlp(experts, hidden_states if quantized else hidden_states[src], sorted_ids, grouped)
    per_slot = torch.empty_like(out).index_copy_(0, perm, out)
    return _combine(per_slot, top_k_weights, hidden_states.dtype)


def _decode(experts: nn.Module, hidden_states: torch.Tensor, expert_ids: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """Few tokens on CUDA: pairs in token order, each through its expert (:mod:`.routed_gemv`); no sort. The up
    projection reads each token's hidden state in place (``top_k`` pairs per row)."""
    top_k = top_k_weights.shape[-1]

    def routed(x: torch.Tensor, weight: layout.Weight, first: bool) -> torch.Tensor:
        if isinstance(weight, QuantizedWeight):
            return quantized_ops.routed(x, weight, expert_ids, top_k if first else 1)
        return torch.ops.moe_fx.routed_gemv(x, weight, expert_ids, top_k if first else 1, experts.is_transposed)

    return _combine(layout.expert_mlp(experts, hidden_states, expert_ids, routed), top_k_weights, hidden_states.dtype)


def _combine(per_slot: torch.Tensor, top_k_weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Each token's expert outputs (``[T * k, H]`` in slot order) weighted by its routing weights and summed;
    fp32 routing weights promote the sum, as in transformers' kernels."""
    weighted = per_slot.view(*top_k_weights.shape, -1) * top_k_weights.unsqueeze(-1)
    return weighted.sum(dim=1).to(dtype)


def _exporting() -> bool:
    """Whether ``torch.export`` (ONNX) traces this call. The flag is read directly: Dynamo in torch 2.11 folds
    ``torch.compiler.is_exporting()`` to True inside ``torch.compile`` too, which would send compiled models
    down the export path."""
    return bool(getattr(torch.compiler, "_is_exporting_flag", torch.compiler.is_exporting()))
