"""The Triton kernels of the moe_fx experts (CUDA; imported only where Triton is).

``triton_grouped_mm`` (``moe_fx::grouped_mm`` in dtypes without a native grouped GEMM, and bf16 decode): rows
sorted by expert times that expert's weight. ``triton_routed_gemv`` (``moe_fx::routed_gemv``, decode): one
program per routed (token, slot) pair and column tile, a matrix-vector product that streams the expert's rows.

``triton_grouped_mm``: program ``(e, n)`` computes output columns ``n*BLOCK_N:(n+1)*BLOCK_N`` of expert ``e``'s
rows ``offsets[e-1]:offsets[e]``, ``BLOCK_M`` rows at a time, streaming that slice of the expert's weight
(from L2 after the first block). The grid is ``(E, N / BLOCK_N)`` whatever the routing, and a program whose
expert has no rows returns before reading anything: the kernel needs no block table (no extra kernels, no
host work), runs under CUDA graphs with no host sync, and its bytes read follow the distinct experts hit.

Both launch through ``wrap_triton``: eagerly it is a plain launch; inside the ``triton_op``s
(``moe_fx::triton_grouped_mm``, ``moe_fx::routed_gemv``) torch.compile sees the kernel and Inductor launches it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton


@triton.jit
def _grouped_mm_kernel(
    x_ptr, w_ptr, out_ptr, offsets_ptr,
    N, K,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    expert = tl.program_id(0)
    pid_n = tl.program_id(1)
    end = tl.load(offsets_ptr + expert)
    start = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0)
    if start >= end:
        return
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    col_ok = cols < N
    w_base = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wn
    for row0 in range(start, end, BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        x_base = x_ptr + rows[:, None].to(tl.int64) * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = k0 + ks < K
            a = tl.load(x_base + (k0 + ks)[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_base + (k0 + ks)[:, None] * stride_wk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(a, b, input_precision="ieee")
            else:
                acc += tl.dot(a, b)
        out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


Tiles = tuple[int, int, int, int, int]
"""(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of one ``triton_grouped_mm`` launch."""


def grouped_tiles(rows: int, num_experts: int, dtype: torch.dtype) -> Tiles:
    """Small row blocks and long weight streams for decode (few rows per expert), square tiles when experts
    have many rows; fp32 halves BLOCK_K to stay within shared memory."""
    few = rows <= 8 * num_experts
    block_m, block_n, block_k, warps, stages = (16, 64, 128, 4, 4) if few else (64, 128, 64, 8, 3)
    if dtype == torch.float32:
        block_k //= 2
    return block_m, block_n, block_k, warps, stages


def triton_grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, tiles: Tiles | None = None) -> torch.Tensor:
    """``x [S, K]`` (sorted by expert) times ``w [E, K, N]`` (any strides) per expert -> ``[S, N]``; ``tiles``
    overrides :func:`grouped_tiles` (benchmarks)."""
    rows, k = x.shape
    num_experts, _, n = w.shape
    out = x.new_empty(rows, n)
    if rows == 0:
        return out
    block_m, block_n, block_k, warps, stages = tiles or grouped_tiles(rows, num_experts, x.dtype)
    wrap_triton(_grouped_mm_kernel)[(num_experts, triton.cdiv(n, block_n))](
        x, w, out, offsets, n, k,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=x.dtype == torch.float32,
        num_warps=warps, num_stages=stages,
    )
    return out


@triton.jit
def _routed_gemv_kernel(
    x_ptr, w_ptr, ids_ptr, out_ptr,
    N, K, ROWS_PER_X,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_om, stride_on,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    col_ok = cols < N
    x_row = x_ptr + (pair // ROWS_PER_X).to(tl.int64) * stride_xm
    w_base = w_ptr + expert * stride_we + cols[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + ks < K
        x = tl.load(x_row + (k0 + ks) * stride_xk, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(w_base + (k0 + ks)[None, :] * stride_wk, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    tl.store(out_ptr + pair.to(tl.int64) * stride_om + cols * stride_on, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def triton_routed_gemv(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, rows_per_x: int) -> torch.Tensor:
    """``out[p] = x[p // rows_per_x] @ w[ids[p]]`` for each routed pair ``p``: ``x [P / rows_per_x, K]``,
    ``w [E, K, N]`` (any strides), ``ids [P]`` -> ``[P, N]``. One program per (pair, column tile), fp32
    accumulation; no sort, no gather of ``x``."""
    pairs = ids.shape[0]
    k, n = w.shape[1], w.shape[2]
    out = x.new_empty(pairs, n, dtype=w.dtype)
    if pairs == 0:
        return out
    block_n, block_k = 32, 256 if w.element_size() <= 2 else 128
    wrap_triton(_routed_gemv_kernel)[(pairs, triton.cdiv(n, block_n))](
        x, w, ids, out, n, k, rows_per_x,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return out
