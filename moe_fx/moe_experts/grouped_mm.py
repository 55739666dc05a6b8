"""``moe_fx::grouped_mm``: rows sorted by expert times each expert's weight, as one opaque operator.

Rows ``offsets[e-1]:offsets[e]`` of ``x`` belong to expert ``e``. Each active expert's weight is read once,
an expert with no rows is not read, and nothing is allocated but the output: memory and bytes read follow
the distinct routed experts, never tokens x top-k x expert size. Two kernels run it:

- ``native``: ``torch.nn.functional.grouped_mm`` (CUTLASS on CUDA in bf16, torch's CPU kernel in any dtype).
- ``triton`` (CUDA): blocks of at most ``BLOCK_M`` rows of one expert; the grid has a static upper bound of
  blocks, so it runs under CUDA graphs with no host sync. It runs the dtypes the native kernel lacks (fp32,
  fp16), and bf16 with few rows per expert (:data:`TRITON_MAX_ROWS_PER_EXPERT`), where it was faster.

Being a custom operator, ``torch.compile(fullgraph=True)`` sees one call, on CPU in fp32 too (Inductor's own
``grouped_mm`` lowering is bf16-only). Set ``MOE_FX_GROUPED_MM=triton|native`` to force a kernel (benchmarks).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports (it ships with CUDA builds of torch, not CPU ones)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _native_function():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@functools.cache
def native_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's own grouped GEMM runs here: CPU kernels since torch 2.10 (any float dtype); CUDA in
    bf16 on compute capability 8.0 or newer. Cached: compiled models call it on every step (no driver query)."""
    if _native_function() is None:
        return False
    if device.type == "cpu":
        return tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 10)
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
    return False


@torch.compiler.assume_constant_result
def supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``moe_fx::grouped_mm`` has a kernel for tensors of ``dtype`` on ``device``. Dynamo runs it once and
    keeps the result as a constant; not itself cached, because Dynamo inlines a ``functools.cache`` wrapper (with a
    warning on every compile) instead of honouring ``assume_constant_result`` (the helpers it calls are cached)."""
    return native_supported(device, dtype) or (device.type == "cuda" and triton_available())


TRITON_MAX_ROWS_PER_EXPERT = 16
"""Rows per expert up to which the Triton kernel runs even where the native one exists. On an H200 at
Qwen3-30B-A3B expert shapes (``benchmarks/experts_kernels.py``) it took 15% less time than CUTLASS at 1 and 4
rows per expert (decode at batch 16 and 64) and 5% less at 16; at 256 rows (a 4096-token prefill) CUTLASS took
22% less."""


def kernel_for(x: torch.Tensor, num_experts: int) -> str:
    """``native`` where torch has a grouped GEMM for ``x`` and experts get many rows, else ``triton``;
    ``MOE_FX_GROUPED_MM`` overrides. Runs eagerly inside the operator, so the row count is a plain int."""
    forced = os.environ.get("MOE_FX_GROUPED_MM", "auto")
    if forced in ("triton", "native"):
        return forced
    if not native_supported(x.device, x.dtype):
        return "triton"
    few_rows = x.shape[0] <= TRITON_MAX_ROWS_PER_EXPERT * num_experts
    return "triton" if few_rows and x.device.type == "cuda" and triton_available() else "native"


def _as_in_out(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``[E, in, out]`` view of a weight stored ``[E, out, in]`` (``transposed=False``) or ``[E, in, out]``."""
    return weight if transposed else weight.transpose(-2, -1)


@torch.library.custom_op("moe_fx::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``out[r] = x[r] @ W[e]^T`` (``W[e]`` when ``transposed``) for each row ``r`` of expert ``e``.

    ``x``: ``[S, in]`` sorted by expert; ``weight``: ``[E, out, in]`` (or ``[E, in, out]``); ``offsets``: ``[E]``
    int32, the running row count after each expert. Returns ``[S, out]`` in the weight's dtype.
    """
    w = _as_in_out(weight, transposed)
    x = x.to(w.dtype)
    if kernel_for(x, w.shape[0]) == "triton":
        from .triton_kernels import triton_grouped_mm

        return triton_grouped_mm(x, w, offsets)
    return _native_function()(x, w, offs=offsets)


@grouped_mm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, transposed: bool) -> torch.Tensor:
    torch._check(offsets.shape[0] == weight.shape[0], lambda: "offsets must hold one entry per expert")
    return x.new_empty(x.shape[0], weight.shape[-2 if not transposed else -1], dtype=weight.dtype)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, offsets, transposed = inputs
    ctx.save_for_backward(x, weight, offsets)
    ctx.transposed = transposed


def _backward(ctx, grad: torch.Tensor):
    """Input gradient through the same operator (the weight read the other way round); weight gradient as one
    grouped GEMM of ``x^T`` and ``grad`` (native kernel), only when the weight asks for it."""
    x, weight, offsets = ctx.saved_tensors
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = grouped_mm(grad.contiguous(), weight, offsets, not ctx.transposed).to(x.dtype)
    if ctx.needs_input_grad[1]:
        in_out = _native_function()(x.to(weight.dtype).t(), grad.to(weight.dtype), offs=offsets)
        grad_w = in_out if ctx.transposed else in_out.transpose(-2, -1).contiguous()
    return grad_x, grad_w, None, None


grouped_mm.register_autograd(_backward, setup_context=_setup_context)
