"""The Triton kernels of the moe_fx experts (CUDA; imported only where Triton is).

``triton_grouped_mm`` (``moe_fx::grouped_mm`` in dtypes without a native grouped GEMM, and bf16 decode): rows
sorted by expert times that expert's weight. ``triton_routed_gemv`` (``moe_fx::routed_gemv``, decode): one
program per routed (token, slot) pair and column tile, a matrix-vector product that streams the expert's rows.

``triton_grouped_mm``: program ``(e, n)`` computes output columns ``n*BLOCK_N:(n+1)*BLOCK_N`` of expert ``e``'s
rows ``offsets[e-1]:offsets[e]``, ``BLOCK_M`` rows at a time, streaming that slice of the expert's weight
(from L2 after the first block). The grid is ``(E, N / BLOCK_N)`` whatever the routing, and a program whose
expert has no rows returns before reading anything: the kernel needs no block table (no extra kernels, no
host work), runs under CUDA graphs with no host sync, and its bytes read follow the distinct experts hit.

Quantized experts (:mod:`.quantized`): ``QUANT`` 1 reads FP8 or int8 codes, 2 unpacks two 4-bit codes a byte;
either way each ``BLOCK_K`` tile lies in one scale group, so a tile's codes are multiplied by one scale per
output column (``scale[e, n, k0 // GROUP]``) inside the kernel: bytes read are the codes and their scales,
never a dequantized weight. ``QUANT`` 0 is the dense kernel, unchanged.

Both kernels are weight-only: activations stay in their dtype and each tile of codes is converted in
registers, so results are the dequantized weights' (the CPU reference path's). On an H200 at Qwen3-30B-A3B shapes
(``experts_kernels.py --sweep-quantized``) the conversions, not the bytes, bound them: FP8 codes stream at
2.2-2.7 TB/s through the routed GEMV and 1.7-1.9 TB/s through the grouped kernel, against 3.5-4.3 TB/s for
bf16 weights, so FP8 halves the bytes but saves less time. A variant quantizing each row's activations per
128 inputs inside the grouped kernel and multiplying on 8-bit tensor cores (the hub FP8 checkpoints'
``activation_scheme: dynamic``) was slower still (178 against 160 us at 16 tokens; a 4-layer prefill at 0.77x
the weight-only kernel's tokens/s) and was removed: the activations were re-quantized by every column tile.

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
    x_ptr, w_ptr, out_ptr, offsets_ptr, scale_ptr,
    N, K, GROUP,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_om, stride_on, stride_se, stride_sn, stride_sg,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr, QUANT: tl.constexpr,
):
    expert = tl.program_id(0)
    pid_n = tl.program_id(1)
    end = tl.load(offsets_ptr + expert)
    start = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0)
    if start >= end:
        return
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    halves = tl.arange(0, BLOCK_K // 2)
    col_ok = cols < N
    w_base = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wn
    for row0 in range(start, end, BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        x_base = x_ptr + rows[:, None].to(tl.int64) * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if QUANT == 0:
                k_ok = k0 + ks < K
                a = tl.load(x_base + (k0 + ks)[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(w_base + (k0 + ks)[:, None] * stride_wk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                acc += _dot(a, b, IEEE)
            else:
                scale = tl.load(scale_ptr + expert.to(tl.int64) * stride_se + cols * stride_sn + (k0 // GROUP) * stride_sg, mask=col_ok, other=0.0)
                if QUANT == 1:
                    # dequantized tile by tile: codes times their columns' scales, in the activations' dtype
                    k_ok = k0 + ks < K
                    a = tl.load(x_base + (k0 + ks)[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    w_ok = k_ok[:, None] & col_ok[None, :]
                    codes = tl.where(w_ok, tl.load(w_base + (k0 + ks)[:, None] * stride_wk, mask=w_ok).to(tl.float32), 0.0)
                    acc += _dot(a, (codes * scale[None, :]).to(a.dtype), IEEE)
                else:
                    # even and odd inputs as two products (their codes share a byte); the tile's scale once, after them
                    kk = k0 + 2 * halves
                    even_ok = kk < K
                    a_even = tl.load(x_base + kk[None, :] * stride_xk, mask=row_ok[:, None] & even_ok[None, :], other=0.0)
                    a_odd = tl.load(x_base + (kk + 1)[None, :] * stride_xk, mask=row_ok[:, None] & even_ok[None, :], other=0.0)
                    byte = tl.load(w_base + (k0 // 2 + halves)[:, None] * stride_wk, mask=even_ok[:, None] & col_ok[None, :], other=0)
                    low, high = _nibbles(byte, a_even.dtype)
                    acc += (_dot(a_even, low, IEEE) + _dot(a_odd, high, IEEE)) * scale[None, :]
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


def triton_grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, tiles: Tiles | None = None,
                      quant: Quantized | None = None) -> torch.Tensor:
    """``x [S, K]`` (sorted by expert) times ``w [E, K, N]`` (any strides) per expert -> ``[S, N]``; ``tiles``
    overrides :func:`grouped_tiles` (benchmarks). With ``quant``, ``w`` holds codes (``[E, K / 2, N]`` for 4-bit)
    and the output is in ``x``'s dtype."""
    rows, k = x.shape
    num_experts, n = w.shape[0], w.shape[2]
    out = x.new_empty(rows, n)
    if rows == 0:
        return out
    block_m, block_n, block_k, warps, stages = tiles or grouped_tiles(rows, num_experts, x.dtype)
    scale, group, kind = _quant_args(quant, w, block_k, k)
    wrap_triton(_grouped_mm_kernel)[(num_experts, triton.cdiv(n, block_n))](
        x, w, out, offsets, scale, n, k, group,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        scale.stride(0), scale.stride(1), scale.stride(2),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=x.dtype == torch.float32, QUANT=kind,
        num_warps=warps, num_stages=stages,
    )
    return out


Quantized = tuple[torch.Tensor, int, int]
"""(scales ``[E, N, groups]``, inputs per scale, ``QUANT``) of quantized codes."""


def _quant_args(quant: Quantized | None, w: torch.Tensor, block_k: int, k: int) -> tuple[torch.Tensor, int, int]:
    """The kernels' scale pointer, group and ``QUANT`` (the weight itself, unread, and 0 when dense); a tile
    must lie in one group."""
    if quant is None:
        return w, k, 0
    scale, group, kind = quant
    if group % block_k and group < k:
        raise ValueError(f"scale groups of {group} inputs do not align with {block_k}-input tiles")
    return scale, group, kind


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _nibbles(byte, dtype: tl.constexpr):
    """The two signed 4-bit codes of each byte (low nibble: the even input), offset 8 removed, in ``dtype``."""
    low = (byte & 0xF).to(tl.int32) - 8
    high = (byte >> 4).to(tl.int32) - 8
    return low.to(dtype), high.to(dtype)


@triton.jit
def _routed_gemv_kernel(
    x_ptr, w_ptr, ids_ptr, out_ptr, scale_ptr,
    N, K, ROWS_PER_X, GROUP,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_om, stride_on, stride_se, stride_sn, stride_sg,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, QUANT: tl.constexpr,
):
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    halves = tl.arange(0, BLOCK_K // 2)
    col_ok = cols < N
    x_row = x_ptr + (pair // ROWS_PER_X).to(tl.int64) * stride_xm
    w_base = w_ptr + expert * stride_we + cols[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if QUANT == 2:
            kk = k0 + 2 * halves  # even inputs; their odd neighbours share the byte
            even_ok = kk < K
            x_even = tl.load(x_row + kk * stride_xk, mask=even_ok, other=0.0).to(tl.float32)
            x_odd = tl.load(x_row + (kk + 1) * stride_xk, mask=even_ok, other=0.0).to(tl.float32)
            byte = tl.load(w_base + (k0 // 2 + halves)[None, :] * stride_wk, mask=col_ok[:, None] & even_ok[None, :], other=0)
            low, high = _nibbles(byte, tl.float32)
            part = tl.sum(low * x_even[None, :], axis=1) + tl.sum(high * x_odd[None, :], axis=1)
        else:
            k_ok = k0 + ks < K
            x = tl.load(x_row + (k0 + ks) * stride_xk, mask=k_ok, other=0.0).to(tl.float32)
            w_ok = col_ok[:, None] & k_ok[None, :]
            if QUANT == 0:
                w = tl.load(w_base + (k0 + ks)[None, :] * stride_wk, mask=w_ok, other=0.0)
            else:  # FP8 cannot take an ``other`` value everywhere: masked lanes are zeroed after the load
                w = tl.where(w_ok, tl.load(w_base + (k0 + ks)[None, :] * stride_wk, mask=w_ok).to(tl.float32), 0.0)
            part = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        if QUANT == 0:
            acc += part
        else:
            acc += part * tl.load(scale_ptr + expert * stride_se + cols * stride_sn + (k0 // GROUP) * stride_sg, mask=col_ok, other=0.0)
    tl.store(out_ptr + pair.to(tl.int64) * stride_om + cols * stride_on, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


GemvTiles = tuple[int, int, int]
"""(BLOCK_N, BLOCK_K, num_warps) of one ``triton_routed_gemv`` launch."""


def gemv_tiles(w: torch.Tensor, quant: Quantized | None) -> GemvTiles:
    """Dense: 32 columns a program, 256 inputs a step for 16-bit weights, 128 for fp32. Quantized codes take
    128 inputs a step (a step lies in one scale group) and the shapes fastest at one token on an H200
    (``experts_kernels.py --sweep-quantized``): FP8 64 columns and 8 warps, int8 32 and 4, int4 16 and 4."""
    if quant is None:
        return 32, 256 if w.element_size() <= 2 else 128, 4
    if quant[2] == 2:
        return 16, 128, 4
    return (64, 128, 8) if w.dtype == torch.float8_e4m3fn else (32, 128, 4)


def triton_routed_gemv(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, rows_per_x: int,
                       quant: Quantized | None = None, tiles: GemvTiles | None = None) -> torch.Tensor:
    """``out[p] = x[p // rows_per_x] @ w[ids[p]]`` for each routed pair ``p``: ``x [P / rows_per_x, K]``,
    ``w [E, K, N]`` (any strides), ``ids [P]`` -> ``[P, N]``. One program per (pair, column tile), fp32
    accumulation; no sort, no gather of ``x``. With ``quant``, ``w`` holds codes (``[E, K / 2, N]`` for 4-bit)
    and the output is in ``x``'s dtype; ``tiles`` overrides :func:`gemv_tiles` (benchmarks)."""
    pairs = ids.shape[0]
    k, n = x.shape[1], w.shape[2]
    out = x.new_empty(pairs, n, dtype=w.dtype if quant is None else x.dtype)
    if pairs == 0:
        return out
    block_n, block_k, warps = tiles or gemv_tiles(w, quant)
    scale, group, kind = _quant_args(quant, w, block_k, k)
    wrap_triton(_routed_gemv_kernel)[(pairs, triton.cdiv(n, block_n))](
        x, w, ids, out, scale, n, k, rows_per_x, group,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        scale.stride(0), scale.stride(1), scale.stride(2),
        BLOCK_N=block_n, BLOCK_K=block_k, QUANT=kind, num_warps=warps,
    )
    return out
