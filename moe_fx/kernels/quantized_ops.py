"""The operators that multiply rows by quantized experts (:mod:`.quantized`) on CUDA, codes read in the kernel.

``moe_fx::quantized_routed_gemv`` (decode: one program per routed pair) and ``moe_fx::quantized_grouped_mm``
(rows sorted by expert) are the dense paths' Triton kernels with ``QUANT`` set (:mod:`.triton_kernels`); both are
``triton_op``s, so torch.compile launches them from Inductor's code and CUDA graphs capture them. Inference
only: with gradients (or off CUDA) the moe_fx forward takes the reference path, which dequantizes just the
experts a call runs (:meth:`QuantizedWeight.gather`).
"""

from __future__ import annotations

import torch

from moe_fx.kernels import grouped_mm
from moe_fx.kernels.quantized import SCHEMES, QuantizedWeight


def runs(weight: QuantizedWeight) -> bool:
    """Whether the quantized kernels run this weight here: CUDA with Triton, inference."""
    return grouped_mm.triton_here(weight.device) and not torch.is_grad_enabled()


def _kernel_args(codes: torch.Tensor, scale: torch.Tensor, scheme: str, in_features: int) -> tuple[torch.Tensor, tuple]:
    spec = SCHEMES[scheme]
    return codes.transpose(-2, -1), (scale, spec.group_size(in_features), spec.kernel)


def _routed_gemv(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, expert_ids: torch.Tensor, rows_per_x: int, scheme: str) -> torch.Tensor:
    """``out[p] = x[p // rows_per_x] @ W[expert_ids[p]]^T`` for codes ``[E, N, K (/ 2)]`` -> ``[P, N]`` in ``x``'s dtype."""
    from moe_fx.kernels.triton_kernels import triton_routed_gemv

    w, quant = _kernel_args(codes, scale, scheme, x.shape[-1])
    return triton_routed_gemv(x, w, expert_ids, rows_per_x, quant)


def _grouped_mm(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, offsets: torch.Tensor, scheme: str) -> torch.Tensor:
    """Rows of ``x`` sorted by expert (``offsets`` as ``moe_fx::grouped_mm``'s) times their experts' codes."""
    from moe_fx.kernels.triton_kernels import triton_grouped_mm

    w, quant = _kernel_args(codes, scale, scheme, x.shape[-1])
    return triton_grouped_mm(x, w, offsets, quant=quant)


quantized_routed_gemv = grouped_mm.triton_op("moe_fx::quantized_routed_gemv", _routed_gemv)
quantized_grouped_mm = grouped_mm.triton_op("moe_fx::quantized_grouped_mm", _grouped_mm)


def routed(x: torch.Tensor, weight: QuantizedWeight, expert_ids: torch.Tensor, rows_per_x: int) -> torch.Tensor:
    return torch.ops.moe_fx.quantized_routed_gemv(x, weight.codes, weight.scale, expert_ids, rows_per_x, weight.scheme)


def grouped(x: torch.Tensor, weight: QuantizedWeight, offsets: torch.Tensor) -> torch.Tensor:
    return torch.ops.moe_fx.quantized_grouped_mm(x, weight.codes, weight.scale, offsets, weight.scheme)
