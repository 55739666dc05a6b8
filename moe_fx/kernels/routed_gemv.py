"""``moe_fx::routed_gemv``: the decode path's matmul, one (token, slot) pair at a time (CUDA, Triton).

With a handful of tokens the routed pairs hit distinct experts almost surely (top-k of one token always
does), so sorting pairs by expert buys nothing and costs kernels: here each pair's row is multiplied by its
expert's weight directly, the up projection reading the token's hidden state in place
(``rows_per_x = top_k``). Bytes read: one expert per pair, which equals the distinct experts while pairs
rarely collide (:data:`MAX_PAIRS_PER_EXPERT`). A ``triton_op``: torch.compile sees the kernel and Inductor
launches it from its generated code (no Triton Python launch per call).
"""

from __future__ import annotations

import torch

from moe_fx.kernels import grouped_mm

MAX_PAIRS_PER_EXPERT = 0.25
"""Routed pairs per expert up to which decode takes this path: at ``P / E = 1/4`` the expected share of pairs
whose expert another pair also hit is under 12%."""


WEIGHT_ONLY_MAX_PAIRS_PER_EXPERT = 1.0
"""The same bound for 8-bit codes whose grouped kernel is weight-only (no 8-bit tensor cores, or
``MOE_FX_QUANTIZED_ACTIVATIONS=weight-only``): it converts codes in every tile, so the GEMV stays faster up to
one pair per expert (FP8 at Qwen3-30B-A3B shapes, 16 tokens: 106 against 137 us for the up projection on an
H200, ``experts_kernels.py --sweep-quantized``). With 8-bit activations the grouped kernel wins from there
(73 against 94 us), and so does the int4 one (16 tokens: 89 against 162 us, H100,
``benchmarks/int4_kernels.py``): :data:`MAX_PAIRS_PER_EXPERT` applies to both."""


def applies(num_pairs: int, num_experts: int, device: torch.device, weight_only: bool = False) -> bool:
    """Whether the decode path runs: inference (it has no backward) on CUDA with Triton, few pairs per expert
    (``weight_only``: 8-bit codes whose grouped kernel converts them, :func:`.quantized_ops.converts_8bit_codes`)."""
    few = num_pairs <= (WEIGHT_ONLY_MAX_PAIRS_PER_EXPERT if weight_only else MAX_PAIRS_PER_EXPERT) * num_experts
    return few and not torch.is_grad_enabled() and grouped_mm.triton_here(device)


def _routed_gemv(x: torch.Tensor, weight: torch.Tensor, expert_ids: torch.Tensor, rows_per_x: int, transposed: bool) -> torch.Tensor:
    """``out[p] = x[p // rows_per_x] @ W[expert_ids[p]]^T`` (``W[e]`` when ``transposed``), ``[P, out]`` in the
    weight's dtype; ``weight`` is ``[E, out, in]`` (``[E, in, out]`` when ``transposed``)."""
    from moe_fx.kernels.triton_kernels import triton_routed_gemv

    return triton_routed_gemv(x, weight if transposed else weight.transpose(-2, -1), expert_ids, rows_per_x)


routed_gemv = grouped_mm.triton_op("moe_fx::routed_gemv", _routed_gemv)

