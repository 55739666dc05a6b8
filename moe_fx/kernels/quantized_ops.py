"""The operators that multiply rows by quantized experts (:mod:`.quantized`) on CUDA, codes read in the kernel.

``moe_fx::quantized_routed_gemv`` (decode: one program per routed pair) and ``moe_fx::quantized_grouped_mm``
(rows sorted by expert) are the dense paths' Triton kernels with ``QUANT`` set (:mod:`.triton_kernels`); both are
``triton_op``s, so torch.compile launches them from Inductor's code and CUDA graphs capture them. Inference
only: with gradients (or off CUDA) the moe_fx forward takes the reference path, which dequantizes just the
experts a call runs (:meth:`QuantizedWeight.gather`).

Activations: the routed GEMV (a handful of tokens, bound by the bytes of the weights) keeps them in their
dtype. On a GPU with tensor cores for them (FP8: compute capability 8.9, int8: 8.0), the grouped kernel first
quantizes the sorted rows, one scale per row and 128 inputs (:func:`~.triton_kernels.quantize_rows`, once per
projection): to the codes' kind for FP8 and int8 codes, which then multiply 8-bit by 8-bit with no code
converted in the inner loop, and to int8 for int4 codes, each nibble becoming an int8 in one instruction per
four codes. For FP8 that is the hub checkpoints' ``activation_scheme: dynamic`` (DeepSeek-V3, Qwen3-*-FP8),
whose models were evaluated that way. It adds the activations' rounding (e4m3: about 4% of a row's norm, int8
under 1%) to the weights': on qwen3moe-bench, +0.0015 and -0.0005 mean NLL over the weight-only kernels
(``benchmarks/quantize_quality.py`` on an H200); int4's int8 rows +0.0003 unpruned and -0.0000 after REAP 50%
(``benchmarks/int8_rows_quality.py``, the kernel emulated on a CPU). For int4 it made prefill 1.13x faster
(Qwen3-30B-A3B shapes, H100; decode 1.05-1.07x). An earlier int8 form of int4 measured slower, while its codes
still loaded a byte at a time.
``MOE_FX_QUANTIZED_ACTIVATIONS=weight-only`` keeps the grouped kernel weight-only for every scheme
(benchmarks, checks).
"""

from __future__ import annotations

import functools
import os

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


@functools.cache
def _has_8bit_tensor_cores(device: torch.device, fp8: bool) -> bool:
    return torch.cuda.get_device_capability(device) >= ((8, 9) if fp8 else (8, 0))


@torch.compiler.assume_constant_result
def activations_8bit(device: torch.device, scheme: str) -> bool:
    """Whether the grouped kernel quantizes activations for ``scheme``'s codes here (see the module doc); a
    constant of the compiled graph, read where it is traced."""
    if os.environ.get("MOE_FX_QUANTIZED_ACTIVATIONS", "auto") == "weight-only":
        return False
    spec = SCHEMES[scheme]
    return spec.kernel in (1, 2) and device.type == "cuda" and _has_8bit_tensor_cores(device, spec.fp8)


def converts_8bit_codes(weight: QuantizedWeight) -> bool:
    """Whether the grouped kernel converts this weight's 8-bit codes to the activations' dtype in every tile
    (weight-only: no 8-bit tensor cores here, or ``MOE_FX_QUANTIZED_ACTIVATIONS=weight-only``), which keeps the
    routed GEMV faster up to more pairs per expert (:data:`~.routed_gemv.WEIGHT_ONLY_MAX_PAIRS_PER_EXPERT`)."""
    return SCHEMES[weight.scheme].kernel == 1 and not activations_8bit(weight.device, weight.scheme)


def _grouped_mm(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, offsets: torch.Tensor, scheme: str,
                src: torch.Tensor | None = None) -> torch.Tensor:
    """Rows sorted by expert (``offsets`` as ``moe_fx::grouped_mm``'s) times their experts' codes; with ``src``,
    sorted row ``r`` is ``x[src[r]]``, read in place (8-bit activations: each row of ``x`` quantized once)."""
    from moe_fx.kernels.triton_kernels import quantize_rows, triton_grouped_mm

    w, quant = _kernel_args(codes, scale, scheme, x.shape[-1])
    if activations_8bit(x.device, scheme):
        x_codes, x_scale = quantize_rows(x, SCHEMES[scheme].fp8)
        return triton_grouped_mm(x_codes, w, offsets, quant=quant, x_scale=x_scale, out_dtype=x.dtype, src=src)
    return triton_grouped_mm(x, w, offsets, quant=quant, src=src)


quantized_routed_gemv = grouped_mm.triton_op("moe_fx::quantized_routed_gemv", _routed_gemv)
quantized_grouped_mm = grouped_mm.triton_op("moe_fx::quantized_grouped_mm", _grouped_mm)


def routed(x: torch.Tensor, weight: QuantizedWeight, expert_ids: torch.Tensor, rows_per_x: int) -> torch.Tensor:
    return torch.ops.moe_fx.quantized_routed_gemv(x, weight.codes, weight.scale, expert_ids, rows_per_x, weight.scheme)


def grouped(x: torch.Tensor, weight: QuantizedWeight, offsets: torch.Tensor, src: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.moe_fx.quantized_grouped_mm(x, weight.codes, weight.scale, offsets, weight.scheme, src)
