"""``moe_fx::grouped_mm``: rows sorted by expert times each expert's weight, as one opaque operator.

Rows ``offsets[e-1]:offsets[e]`` of ``x`` belong to expert ``e``. Each active expert's weight is read once,
an expert with no rows is not read, and nothing is allocated but the output: memory and bytes read follow
the distinct routed experts, never tokens x top-k x expert size. Two kernels run it:

- ``native``: ``torch.nn.functional.grouped_mm`` (CUTLASS on CUDA in bf16, torch's CPU kernel in any dtype).
- ``triton`` (CUDA): blocks of at most ``BLOCK_M`` rows of one expert; the grid has a static upper bound of
  blocks, so it runs under CUDA graphs with no host sync. It runs the dtypes the native kernel lacks (fp32,
  fp16), and bf16 with few rows per expert (:data:`TRITON_MAX_ROWS_PER_EXPERT`), where it was faster.

Being a custom operator, ``torch.compile(fullgraph=True)`` sees one call, on CPU in fp32 too (Inductor's own
``grouped_mm`` lowering is bf16-only). :func:`grouped_matmul` picks the kernel where the graph is traced; for
inference on the Triton kernel it calls ``moe_fx::triton_grouped_mm``, a ``triton_op``: Inductor launches that
kernel from its own generated code instead of through Triton's Python launcher (about 100-200 us of host time a
call on an H200 host, which made compiled decode without CUDA graphs host-bound); on the native kernel on CUDA it
calls torch's grouped GEMM itself, which Inductor also launches directly. Set
``MOE_FX_GROUPED_MM=triton|native`` to force a kernel (benchmarks).
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F


def triton_op(name: str, fn):
    """``torch.library.triton_op(name)(fn)``, without the warning torch logs for every such operator registered
    where Triton is missing (CPU builds of torch): there the operator is registered but never called."""
    log = logging.getLogger("torch._library.triton")
    level = log.level
    if not triton_available():
        log.setLevel(logging.ERROR)
    try:
        return torch.library.triton_op(name, mutates_args=())(fn)
    finally:
        log.setLevel(level)


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
def native_here(device: torch.device, dtype: torch.dtype) -> bool:
    """:func:`native_supported` as a constant of the compiled graph. Dynamo runs it once and keeps the result; not
    itself cached, because Dynamo inlines a ``functools.cache`` wrapper (with a warning on every compile) instead
    of honouring ``assume_constant_result`` (the helpers it calls are cached)."""
    return native_supported(device, dtype)


@torch.compiler.assume_constant_result
def triton_here(device: torch.device) -> bool:
    """Whether the Triton kernels run on ``device`` (CUDA with Triton), a constant of the compiled graph."""
    return device.type == "cuda" and triton_available()


def supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``moe_fx::grouped_mm`` has a kernel for tensors of ``dtype`` on ``device``."""
    return native_here(device, dtype) or triton_here(device)


TRITON_MAX_ROWS_PER_EXPERT = 16
"""Rows per expert up to which the Triton kernel runs even where the native one exists. On an H200 at
Qwen3-30B-A3B expert shapes (``benchmarks/experts_kernels.py --sweep-tiles``) CUTLASS took 1.3-2.0x the Triton
kernel's time from 1/4 to 32 rows per expert; with the earlier block-table kernel CUTLASS took 22% less at 256
rows (a 4096-token prefill). Between 32 and 256 rows the crossover was not measured, so the bound stays here."""


def kernel_for(rows: int, weight: torch.Tensor) -> str:
    """``native`` where torch has a grouped GEMM for ``weight`` (its device and dtype: the rows are cast to it) and
    experts get many of the ``rows``, else ``triton``; ``MOE_FX_GROUPED_MM`` overrides. Read where the graph is
    traced (the row count is static there) and again inside the operator when it runs eagerly."""
    forced = os.environ.get("MOE_FX_GROUPED_MM", "auto")
    if forced in ("triton", "native"):
        return forced
    if not native_here(weight.device, weight.dtype):
        return "triton"
    few_rows = rows <= TRITON_MAX_ROWS_PER_EXPERT * weight.shape[0]
    return "triton" if few_rows and triton_here(weight.device) else "native"


def _as_in_out(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``[E, in, out]`` view of a weight stored ``[E, out, in]`` (``transposed=False``) or ``[E, in, out]``."""
    return weight if transposed else weight.transpose(-2, -1)


@torch.library.custom_op("moe_fx::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``out[r] = x[r] @ W[e]^T`` (``W[e]`` when ``transposed``) for each row ``r`` of expert ``e``.

    ``x``: ``[S, in]`` sorted by expert; ``weight``: ``[E, out, in]`` (or ``[E, in, out]``); ``offsets``: ``[E]``
    int32, the running row count after each expert. Returns ``[S, out]`` in the weight's dtype.
    """
    if kernel_for(x.shape[0], weight) == "triton":
        return _on_triton(x, weight, offsets, transposed)
    return _on_native(x, weight, offsets, transposed)


def _on_native(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, transposed: bool) -> torch.Tensor:
    """torch's grouped GEMM call, shared by the custom operator and :func:`grouped_matmul` (CUDA)."""
    w = _as_in_out(weight, transposed)
    return _native_function()(x.to(w.dtype), w, offs=offsets)


def _on_triton(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The Triton kernel's call, shared by the custom operator and the ``triton_op``."""
    from moe_fx.kernels import triton_kernels

    w = _as_in_out(weight, transposed)
    return triton_kernels.triton_grouped_mm(x.to(w.dtype), w, offsets)


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


def _triton_grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``moe_fx::grouped_mm`` on the Triton kernel (CUDA, inference), visible to Inductor (see module doc)."""
    return _on_triton(x, weight, offsets, transposed)


triton_grouped_mm = triton_op("moe_fx::triton_grouped_mm", _triton_grouped_mm)


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Rows sorted by expert times their experts' weights (``moe_fx::grouped_mm``'s contract).

    - Native kernel on CUDA: torch's grouped GEMM itself, as transformers' ``grouped_mm`` calls it. Inductor then
      launches it from its generated code; through the custom operator, its Python dispatch cost about 2 ms of
      host time a forward in a compiled 4-layer 8x512 prefill on an H200 (``benchmarks/prefill_profile.py``),
      enough to make that prefill host-bound. torch's operator has its own autograd.
    - Triton kernel, inference: the ``triton_op``.
    - Otherwise (CPU, where Inductor lowers torch's grouped GEMM in bf16 only; Triton with gradients): the
      custom operator, which compiles as one opaque call in any dtype and carries the autograd formula.
    """
    kernel = kernel_for(x.shape[0], weight)
    if kernel == "native" and weight.device.type == "cuda":
        return _on_native(x, weight, offsets, transposed)
    if kernel == "triton" and not torch.is_grad_enabled():
        return torch.ops.moe_fx.triton_grouped_mm(x, weight, offsets, transposed)
    return torch.ops.moe_fx.grouped_mm(x, weight, offsets, transposed)
