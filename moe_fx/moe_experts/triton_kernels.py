"""The Triton kernels of the moe_fx experts (CUDA; imported only where Triton is).

``triton_grouped_mm`` (``moe_fx::grouped_mm`` in dtypes without a native grouped GEMM): blocks of one expert's
rows times that expert's weight. ``triton_routed_gemv`` (``moe_fx::routed_gemv``, decode): one program per
routed (token, slot) pair and column tile, a matrix-vector product that streams the expert's rows.

``triton_grouped_mm``: rows are sorted by expert. Each expert's rows are cut into blocks of ``BLOCK_M``; program ``(b, n)`` computes
output columns ``n*BLOCK_N:(n+1)*BLOCK_N`` of block ``b``, streaming the expert's weight tile once for all
the block's rows. The number of blocks is bounded by ``min(S, ceil(S / BLOCK_M) + E)`` whatever the
routing, so the grid is static: programs past the real blocks return at once. That keeps the kernel
capturable in a CUDA graph (no host sync) and makes the bytes read follow the distinct experts hit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _grouped_mm_kernel(
    x_ptr, w_ptr, out_ptr, block_expert_ptr, block_row_ptr, offsets_ptr,
    N, K, E,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert >= E:
        return
    row0 = tl.load(block_row_ptr + pid_m)
    end = tl.load(offsets_ptr + expert)
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < end
    col_ok = cols < N
    a_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :] * stride_xk
    b_ptrs = w_ptr + expert.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = ks < K - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
        a_ptrs += BLOCK_K * stride_xk
        b_ptrs += BLOCK_K * stride_wk
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _tiles(rows: int, num_experts: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): small row blocks and long weight streams for decode,
    square tiles when experts have many rows; fp32 halves BLOCK_K to stay within shared memory."""
    few = rows <= 8 * num_experts
    block_m, block_n, block_k, warps, stages = (16, 64, 128, 4, 4) if few else (64, 128, 64, 8, 3)
    if dtype == torch.float32:
        block_k //= 2
    return block_m, block_n, block_k, warps, stages


def block_table(offsets: torch.Tensor, rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block: its expert (``E`` past the real blocks) and first row; device tensors of a static length."""
    num_experts = offsets.shape[0]
    offsets = offsets.to(torch.int64)
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    blocks = (counts + block_m - 1) // block_m
    block_end = torch.cumsum(blocks, 0)
    max_blocks = min(rows, -(-rows // block_m) + num_experts)
    b = torch.arange(max_blocks, device=offsets.device)
    expert = torch.searchsorted(block_end, b, right=True)
    e = expert.clamp(max=num_experts - 1)
    first_row = (offsets - counts)[e] + (b - (block_end - blocks)[e]) * block_m
    return expert.to(torch.int32), first_row.to(torch.int32)


def triton_grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``x [S, K]`` (sorted by expert) times ``w [E, K, N]`` (any strides) per expert -> ``[S, N]``."""
    rows, k = x.shape
    num_experts, _, n = w.shape
    out = x.new_empty(rows, n)
    if rows == 0:
        return out
    block_m, block_n, block_k, warps, stages = _tiles(rows, num_experts, x.dtype)
    expert, first_row = block_table(offsets, rows, block_m)
    grid = (expert.shape[0], triton.cdiv(n, block_n))
    _grouped_mm_kernel[grid](
        x, w, out, expert, first_row, offsets,
        n, k, num_experts,
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
    _routed_gemv_kernel[(pairs, triton.cdiv(n, block_n))](
        x, w, ids, out, n, k, rows_per_x,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return out
