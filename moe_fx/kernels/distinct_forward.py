"""The ``moe_fx`` experts forward for export (ONNX) and for devices without a grouped kernel.

ONNX has no grouped GEMM, and transformers' exportable ``batched_mm`` copies one expert's weights per (token,
slot) pair: memory ``tokens x top-k x expert size``. Here the experts that any token routes to are found
(``nonzero``: a dynamic length, which ONNX's NonZero and ``torch.export`` carry), their weights gathered
once, and every token run through each of them; a token's routing weight, zero for experts it did not pick,
combines the results. Weight memory and bytes follow the distinct experts hit, and one token (decode) costs
exactly its top-k experts. Many tokens cost ``distinct / top-k`` times the routed FLOPs (activations
``tokens x distinct x width``), the price of running in plain ops.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_fx.kernels import experts_module as layout
from moe_fx.kernels.quantized import QuantizedWeight


def distinct_experts_forward(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`` in plain ops."""
    layout.check_supported(experts)
    up, _ = layout.up_projection(experts)
    hit = torch.zeros(up.shape[0], dtype=torch.bool, device=up.device).index_fill(0, top_k_index.reshape(-1), True)
    used = hit.nonzero().squeeze(-1)
    # each token's routing weight per used expert, zero where it did not pick it (a comparison, not a
    # scatter-add: onnxruntime has no fp16 ScatterElements-add)
    picked = top_k_index.unsqueeze(-1) == used.view(1, 1, -1)  # [T, k, U]
    combine = (picked.to(top_k_weights.dtype) * top_k_weights.unsqueeze(-1)).sum(1)  # [T, U]

    def gathered(x: torch.Tensor, weight: layout.Weight, first: bool) -> torch.Tensor:
        dense = weight.gather(used, x.dtype) if isinstance(weight, QuantizedWeight) else weight.index_select(0, used)
        return _linear(x.to(dense.dtype), dense, experts.is_transposed, per_expert_input=not first)

    out = layout.expert_mlp(experts, hidden_states, used, gathered)  # [T, U, H]
    # summed in the routing weights' dtype (fp32 for bf16 experts), as transformers' kernels do
    return torch.einsum("tu,tuh->th", combine, out.to(combine.dtype)).to(hidden_states.dtype)


def _linear(x: torch.Tensor, weight: torch.Tensor, transposed: bool, *, per_expert_input: bool = False) -> torch.Tensor:
    """``x`` times each gathered expert weight (``[U, out, in]``, or ``[U, in, out]`` when ``transposed``):
    ``x`` is ``[T, in]`` shared by the experts, or ``[T, U, in]`` one slice per expert."""
    src = "tui" if per_expert_input else "ti"
    return torch.einsum(f"{src},{'uio' if transposed else 'uoi'}->tuo", x, weight)
