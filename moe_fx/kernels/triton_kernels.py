"""The Triton kernels of the moe_fx experts (CUDA; imported only where Triton is).

``triton_grouped_mm`` (``moe_fx::grouped_mm`` in dtypes without a native grouped GEMM, and bf16 decode): rows
sorted by expert times that expert's weight. ``triton_routed_gemv`` (``moe_fx::routed_gemv``, decode): one
program per routed (token, slot) pair and column tile, a matrix-vector product that streams the expert's rows.

``triton_grouped_mm``: program ``(e, n)`` computes output columns ``n*BLOCK_N:(n+1)*BLOCK_N`` of expert ``e``'s
rows ``offsets[e-1]:offsets[e]``, ``BLOCK_M`` rows at a time, streaming that slice of the expert's weight
(from L2 after the first block). The grid is ``(E, N / BLOCK_N)`` whatever the routing, and a program whose
expert has no rows returns before reading anything: the kernel needs no block table (no extra kernels, no
host work), runs under CUDA graphs with no host sync, and its bytes read follow the distinct experts hit.
With many rows per expert (a prefill) that grid leaves each program a serial walk over its expert's row blocks,
and the quantized kernels then ran at half bf16's rate. There the kernel runs *tiled*: one program per block of
``BLOCK_M`` rows of one expert, the grid a static bound (``rows / BLOCK_M + E`` blocks), and each program
rebuilds the schedule from the offsets in registers (each expert's block count, their running sum, and the
expert whose blocks hold its own index): still no block table, no extra kernel, no host sync. The rows can be
read in place (``src``): sorted row ``r`` is ``x[src[r]]``, so the up projection reads each token's hidden
state without the gather's copy, and 8-bit activations are quantized once a token rather than once a pair.

Quantized experts (:mod:`.quantized`): ``QUANT`` 1 reads FP8 or int8 codes, 2 unpacks two 4-bit codes a byte;
either way each ``BLOCK_K`` tile lies in one scale group, so a tile's product is multiplied by one scale per
output column (``scale[e, n, k0 // GROUP]``) after the tile's dot: bytes read are the codes and their scales,
never a dequantized weight, and codes convert exactly to the activations' dtype (e4m3 and int8 values are
bf16 values; 4-bit codes go through the float ``2^23 + c``, no integer-to-float instruction). ``QUANT`` 3 (grouped
kernel only) multiplies 8-bit codes by rows already quantized to the same kind (:func:`quantize_rows`: one
scale per row and 128 inputs), on 8-bit tensor cores, scaling each tile's product by the rows' and the
columns' scales: no conversion at all in the inner loop (:mod:`.quantized_ops` says when it runs). ``QUANT`` 4
multiplies 4-bit codes by int8 rows on int8 tensor cores: each nibble becomes the int8 ``16 (c - 8)`` in one
``lop3`` per four codes (:func:`_nibble_codes`), where the conversion to bf16 takes 13 instructions per eight codes
and its products run at half the int8 rate. ``QUANT`` 0 is the dense kernel, unchanged.

``SWAP`` (grouped kernel) computes the transposed product, the weights' tile on the left: the 8-bit kernel with
few rows per expert and the int4 kernel with many run faster so (:func:`grouped_tiles`). The int4 kernels load a
tile's activations once and split even from odd inputs in registers, and, compiled for a GPU, convert nibbles
two at a time in inline PTX (:func:`_nibbles_bf16x2`).

Measured on an H200 at Qwen3-30B-A3B shapes (``experts_kernels.py --sweep-quantized``; up projection): the
routed GEMV reads FP8 codes at 2.5-2.7 TB/s (bf16 weights: 3.6), the weight-only grouped kernel at 2.6-2.7 TB/s
with 16-64 tokens, the 8-bit one at 3.5-3.7 TB/s (bf16: 4.3); at 4096 tokens the 8-bit kernel takes 811 us
against CUTLASS's 416 us in bf16. The int4 grouped kernel reads 1.9-2.4 TB/s of packed bytes with 16-64 tokens
on an H100 (bf16 weights: 2.9-3.0, ``benchmarks/int4_kernels.py``): 2.35-2.4 in the up projection since a step of
its loop multiplies two tiles (``SUBS``), so each column's codes are read 128 contiguous bytes a step, where one
128-input tile reads 64 (1.9-2.1 TB/s) and a 64-input tile 32 (1.5-1.8). It read 0.65-0.77 while the codes' load mask was
written in inputs (``k0 + 2 * halves < K``): Triton cannot prove such a mask constant over a vector of bytes,
so it loaded the codes a byte per instruction and outside its software pipeline. The mask is now written in
bytes against the codes' length ``KW`` (``tests/test_kernels_ptx.py`` checks the compiled loads).
An earlier form that quantized the activations inside the grouped kernel re-quantized them for every column
tile and was slower than weight-only; quantizing them once per projection is what made 8-bit tensor cores pay.

Both launch through ``wrap_triton``: eagerly it is a plain launch; inside the ``triton_op``s
(``moe_fx::triton_grouped_mm``, ``moe_fx::routed_gemv``) torch.compile sees the kernel and Inductor launches it.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton


@triton.jit
def _grouped_mm_kernel(
    x_ptr, w_ptr, out_ptr, offsets_ptr, scale_ptr, x_scale_ptr, src_ptr,
    E, N, K, KW, GROUP,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_om, stride_on, stride_se, stride_sn, stride_sg,
    stride_xsm, stride_xsg,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr, QUANT: tl.constexpr,
    FP8: tl.constexpr, SWAP: tl.constexpr, PTX: tl.constexpr, TILED: tl.constexpr, BLOCK_E: tl.constexpr,
    GATHER: tl.constexpr, SUBS: tl.constexpr,
):
    if TILED:
        # one block of BLOCK_M rows a program: the tile schedule (each expert's row blocks, in expert order) is
        # rebuilt from the offsets in registers, so there is no table to launch a kernel for
        n_tiles = tl.cdiv(N, BLOCK_N)
        tile = tl.program_id(0) // n_tiles
        pid_n = tl.program_id(0) % n_tiles
        es = tl.arange(0, BLOCK_E)
        ends = tl.load(offsets_ptr + es, mask=es < E, other=0)
        starts = tl.load(offsets_ptr + es - 1, mask=(es > 0) & (es < E), other=0)
        blocks = (ends - starts + BLOCK_M - 1) // BLOCK_M
        block_ends = tl.cumsum(blocks, 0)
        expert = tl.sum((block_ends <= tile).to(tl.int32), 0)
        if expert >= E:
            return
        this = es == expert
        end = tl.sum(tl.where(this, ends, 0), 0)
        first = tl.sum(tl.where(this, starts, 0), 0) + (tile - tl.sum(tl.where(this, block_ends - blocks, 0), 0)) * BLOCK_M
        last = first + 1
    else:
        expert = tl.program_id(0)
        pid_n = tl.program_id(1)
        end = tl.load(offsets_ptr + expert)
        first = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0)
        last = end
    if first >= end:
        return
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    halves = tl.arange(0, BLOCK_K // 2)
    col_ok = cols < N
    w_base = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wn
    for row0 in range(first, last, BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        if GATHER:
            # the rows are read where they lie (``src[row]``): no sorted copy of them
            src = tl.load(src_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        else:
            src = rows.to(tl.int64)
        x_base = x_ptr + src[:, None] * stride_xm
        acc = tl.zeros((BLOCK_N, BLOCK_M) if SWAP else (BLOCK_M, BLOCK_N), dtype=tl.float32)
        if QUANT != 0:
            # one scale per output column for a whole tile (a tile lies in one scale group), applied after the
            # product; a step of ``SUBS`` tiles holds ``SUBS`` of them. They load one step ahead, into registers:
            # the software pipeliner prefetches only the products' operands, and a load in the step that uses it
            # stalls that step on the memory's latency
            subs = tl.arange(0, SUBS) * BLOCK_K
            scale_base = scale_ptr + expert.to(tl.int64) * stride_se + cols[None, :] * stride_sn
            scale = _step_scales(scale_base, subs, GROUP, stride_sg, col_ok[None, :], K)
            if QUANT >= 3:
                x_scale_base = x_scale_ptr + src[None, :] * stride_xsm
                x_scale = _step_scales(x_scale_base, subs, ACT_GROUP, stride_xsg, row_ok[None, :], K)
        for k0 in range(0, K, BLOCK_K * SUBS):
            if QUANT != 0:
                k_next = k0 + BLOCK_K * SUBS
                next_scale = _step_scales(scale_base, k_next + subs, GROUP, stride_sg, col_ok[None, :], K)
                if QUANT >= 3:
                    next_x_scale = _step_scales(x_scale_base, k_next + subs, ACT_GROUP, stride_xsg, row_ok[None, :], K)
            k_ok = k0 + ks < K
            if QUANT == 0:
                a = tl.load(x_base + (k0 + ks)[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(w_base + (k0 + ks)[:, None] * stride_wk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                acc += _mma(a, b, IEEE, SWAP, False, FP8)
            elif QUANT == 2 or QUANT == 4:
                # a step of SUBS tiles reads SUBS x BLOCK_K / 2 contiguous bytes of each column's codes
                for j in tl.static_range(SUBS):
                    kj = k0 + j * BLOCK_K
                    # even and odd inputs as two products (their codes share a byte), split from one contiguous load
                    a = _codes(x_base + (kj + ks)[None, :] * stride_xk, row_ok[:, None] & (kj + ks < K)[None, :])
                    a_even, a_odd = tl.split(tl.reshape(a, (BLOCK_M, BLOCK_K // 2, 2)))
                    byte = tl.load(w_base + (kj // 2 + halves)[:, None] * stride_wk, mask=(kj // 2 + halves < KW)[:, None] & col_ok[None, :], other=0)
                    w_scale = _sub(scale, j, SUBS)
                    if QUANT == 2:
                        low, high = _nibbles(byte, a_even.dtype, PTX)
                        acc += (_mma(a_even, low, IEEE, SWAP, False, FP8) + _mma(a_odd, high, IEEE, SWAP, False, FP8)) * _per_col(w_scale, SWAP)
                    else:
                        # times 8-bit activations on int8 tensor cores: each nibble ``c`` becomes the int8 ``16 (c - 8)``
                        # (one ``lop3`` a word, :func:`_nibble_codes`), and the 16 comes off with the scales
                        product = _mma_int8(a_even, _nibble_codes(byte, False, PTX), None, SWAP)
                        product = _mma_int8(a_odd, _nibble_codes(byte, True, PTX), product, SWAP)
                        acc += product.to(tl.float32) * _per_row(_sub(x_scale, j, SUBS), SWAP) * _per_col(w_scale * 0.0625, SWAP)
            else:
                b = _codes(w_base + (k0 + ks)[:, None] * stride_wk, k_ok[:, None] & col_ok[None, :])
                if QUANT == 1:
                    # 8-bit codes are exact in the activations' dtype: convert, multiply, scale
                    a = tl.load(x_base + (k0 + ks)[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    acc += _mma(a, b.to(a.dtype), IEEE, SWAP, False, FP8) * _per_col(_sub(scale, 0, SUBS), SWAP)
                else:
                    # 8-bit activations (one scale per row and ACT_GROUP inputs) on 8-bit tensor cores
                    a = _codes(x_base + (k0 + ks)[None, :] * stride_xk, row_ok[:, None] & k_ok[None, :])
                    acc += _mma(a, b, IEEE, SWAP, True, FP8) * _per_row(_sub(x_scale, 0, SUBS), SWAP) * _per_col(_sub(scale, 0, SUBS), SWAP)
            if QUANT != 0:
                scale = next_scale
                if QUANT >= 3:
                    x_scale = next_x_scale
        if SWAP:
            out_ptrs = out_ptr + rows[None, :].to(tl.int64) * stride_om + cols[:, None] * stride_on
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=col_ok[:, None] & row_ok[None, :])
        else:
            out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :] * stride_on
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


ACT_GROUP: tl.constexpr = tl.constexpr(128)
"""Inputs of a row that share one activation scale (``QUANT`` 3): DeepSeek-V3's and the hub FP8 checkpoints'
``activation_scheme: dynamic`` (1 x 128 groups)."""


@triton.jit
def _mma(a, b, IEEE: tl.constexpr, SWAP: tl.constexpr, EIGHT_BIT: tl.constexpr, FP8: tl.constexpr):
    """``a [M, K] @ b [K, N]`` (:func:`_dot`, or :func:`_dot_8bit` for 8-bit codes), or with ``SWAP`` its transpose
    ``b^T @ a^T [N, M]``: the weights' tile is then the left operand, which Hopper's wgmma can take from registers
    (codes converted there) and whose 64+ columns fill its 64-row minimum where a decode tile has only 16 rows."""
    if SWAP:
        left, right = tl.trans(b), tl.trans(a)
    else:
        left, right = a, b
    if EIGHT_BIT:
        product = _dot_8bit(left, right, FP8)
    else:
        product = dot(left, right, IEEE)
    return product


@triton.jit
def _mma_int8(a, b, acc, SWAP: tl.constexpr):
    """``a @ b`` of int8 tiles added to ``acc`` (int32, exact; ``None``: zeros), oriented as :func:`_mma`."""
    if SWAP:
        out = tl.dot(tl.trans(b), tl.trans(a), acc=acc, out_dtype=tl.int32)
    else:
        out = tl.dot(a, b, acc=acc, out_dtype=tl.int32)
    return out


@triton.jit
def _step_scales(base, ks, GROUP, stride, ok, K):
    """The scales of a step's tiles (inputs ``ks``, one tile a row): ``[SUBS, columns or rows]``; tiles past ``K`` 0."""
    return tl.load(base + (ks // GROUP)[:, None] * stride, mask=ok & (ks < K)[:, None], other=0.0)


@triton.jit
def _sub(v, j: tl.constexpr, SUBS: tl.constexpr):
    """Row ``j`` of a step's ``[SUBS, n]`` scales."""
    if SUBS == 1:
        out = tl.reshape(v, (v.shape[1],))
    else:
        out = tl.sum(tl.where((tl.arange(0, SUBS) == j)[:, None], v, 0.0), 0)
    return out


@triton.jit
def _per_col(v, SWAP: tl.constexpr):
    """A per-output-column vector broadcast against the accumulator."""
    if SWAP:
        out = v[:, None]
    else:
        out = v[None, :]
    return out


@triton.jit
def _per_row(v, SWAP: tl.constexpr):
    """A per-row vector broadcast against the accumulator."""
    if SWAP:
        out = v[None, :]
    else:
        out = v[:, None]
    return out


@triton.jit
def _codes(ptrs, mask):
    """8-bit codes (``float8_e4m3fn`` or ``int8``), masked lanes 0."""
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _dot_8bit(a, b, FP8: tl.constexpr):
    """8-bit product in float32: FP8 accumulates in float32, int8 in int32 (exact)."""
    if FP8:
        product = tl.dot(a, b)
    else:
        product = tl.dot(a, b, out_dtype=tl.int32).to(tl.float32)
    return product


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, R, K, stride_xm, stride_qm, stride_sm,
                          QMAX: tl.constexpr, FP8: tl.constexpr, BLOCK_R: tl.constexpr):
    """Rows ``BLOCK_R`` at a time, one ``ACT_GROUP`` of inputs a program: codes ``x / s`` with ``s = max|x| / QMAX``
    per row and group (rounded to the nearest integer for int8)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ks = tl.program_id(1) * ACT_GROUP + tl.arange(0, ACT_GROUP)
    ok = (rows < R)[:, None] & (ks < K)[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :], mask=ok, other=0.0).to(tl.float32)
    s = tl.max(tl.abs(x), axis=1) / QMAX
    q = x / tl.where(s > 0, s, 1.0)[:, None]
    if FP8:
        codes = tl.clamp(q, -QMAX, QMAX).to(tl.float8e4nv)
    else:
        codes = tl.clamp(tl.where(q >= 0, q + 0.5, q - 0.5), -QMAX, QMAX).to(tl.int8)
    tl.store(q_ptr + rows[:, None].to(tl.int64) * stride_qm + ks[None, :], codes.to(tl.uint8, bitcast=True), mask=ok)
    tl.store(s_ptr + rows * stride_sm + tl.program_id(1), s, mask=rows < R)


def quantize_rows(x: torch.Tensor, fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [S, K]`` as 8-bit codes ``[S, K]`` (``float8_e4m3fn`` or ``int8``) and float32 scales ``[S, ceil(K / 128)]``,
    one per row and 128 inputs (what ``QUANT`` 3 multiplies)."""
    x = x.contiguous()  # the kernel reads inputs at unit stride
    rows, k = x.shape
    groups = triton.cdiv(k, ACT_GROUP.value)
    codes = torch.empty(rows, k, dtype=torch.uint8, device=x.device)
    scales = torch.empty(rows, groups, dtype=torch.float32, device=x.device)
    if rows:
        block_r = 16
        wrap_triton(_quantize_rows_kernel)[(triton.cdiv(rows, block_r), groups)](
            x, codes, scales, rows, k, x.stride(0), codes.stride(0), scales.stride(0),
            QMAX=448.0 if fp8 else 127.0, FP8=fp8, BLOCK_R=block_r, num_warps=4,
        )
    return codes.view(torch.float8_e4m3fn if fp8 else torch.int8), scales


class Tiles(NamedTuple):
    """One ``triton_grouped_mm`` launch's shape. ``swap``: the weights' tile is the left operand (:func:`_mma`);
    ``tiled``: one program per block of ``block_m`` rows of one expert (the schedule rebuilt from the offsets in
    each program) instead of one per expert that walks its rows; ``subs``: 4-bit codes only, a step of the
    inner loop multiplies ``subs`` tiles of ``block_k`` inputs, each in its own scale group, so a column's codes
    are read ``subs x block_k / 2`` contiguous bytes a step."""

    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int
    swap: bool
    tiled: bool = False
    subs: int = 1


def grouped_tiles(rows: int, num_experts: int, dtype: torch.dtype, quant: int = 0) -> Tiles:
    """Small row blocks and long weight streams for decode (few rows per expert), square tiles when experts
    have many rows; fp32 halves BLOCK_K to stay within shared memory. ``quant`` is the kernel's ``QUANT``;
    measured on an H200 at Qwen3-30B-A3B shapes (``experts_kernels.py --sweep-quantized``, results in
    ``benchmarks/results/quantize/kernels_h200_run5*.json``):

    - 8-bit activations (``QUANT`` 3) take one activation group a tile and 4 warps with many rows (4096 tokens,
      FP8: 807 against 903 us for the up projection, 328 against 417+ for the down one), and the swapped
      orientation with few (16 tokens: 73 against 75 us up, 39 against 42 down).
    - 4-bit codes (``QUANT`` 2) with few rows take 128 columns (64 tokens: 276 against 322 us up).
    - With many rows both quantized kinds run tiled (one program per 64-row block, :class:`Tiles`), the fastest of
      28 tiled shapes at 4096 tokens on an H100 (``prefill_kernels.py``, ``prefill_kernels_h100_run1.json``; the
      rows read in place): FP8 526 against 1184 us for the up projection per expert, 313 against 461 down
      (bf16's CUTLASS: 539 and 267); int4 811 against 1107 up, 434 against 510 down.
    - 4-bit codes times int8 rows (``QUANT`` 4), H100: with few rows 128 columns, 3 stages and steps of two tiles
      (``subs``: each column's codes read 128 contiguous bytes a step), the least time summed over both
      projections at 16 and 64 tokens of 30 shapes (``int4_kernels_h100_run7.json``: 234 against 257 us for the
      best one-tile-a-step shape, 64 columns and 6 stages; up projection at 16 tokens 59.7 against 68.8 us). Tiles
      of 64 inputs (32 bytes a column a step) were slower still (``int4_kernels_h100_run6.json``). With many rows,
      tiled and swapped (621 against 666 us unswapped, up projection, ``prefill_kernels_h100_run2.json``)."""
    few = rows <= 8 * num_experts
    block_m, block_n, block_k, warps, stages = (16, 64, 128, 4, 4) if few else (64, 128, 64, 8, 3)
    swap, subs = False, 1
    if dtype == torch.float32:
        block_k //= 2
    elif quant == 3:
        block_k, warps, stages, swap = 128, 4, 3, few
    elif quant == 2:
        block_m, block_n, block_k, warps, stages, swap = (16, 128, 128, 4, 3, False) if few else (64, 128, 128, 4, 4, False)
    elif quant == 4:
        block_m, block_n, block_k, warps, stages, swap, subs = (16, 128, 128, 4, 3, False, 2) if few else (64, 128, 128, 4, 3, True, 1)
    return Tiles(block_m, block_n, block_k, warps, stages, swap, tiled=not few and quant in (2, 3, 4), subs=subs)


def triton_grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, tiles: Tiles | tuple | None = None,
                      quant: Quantized | None = None, x_scale: torch.Tensor | None = None,
                      out_dtype: torch.dtype | None = None, src: torch.Tensor | None = None) -> torch.Tensor:
    """``x [S, K]`` (sorted by expert) times ``w [E, K, N]`` (any strides) per expert -> ``[S, N]``; ``tiles``
    overrides :func:`grouped_tiles` (benchmarks). With ``quant``, ``w`` holds codes (``[E, K / 2, N]`` for 4-bit)
    and the output is in ``x``'s dtype. With ``x_scale`` (``[S, ceil(K / 128)]``, from :func:`quantize_rows`) too,
    ``x`` holds 8-bit codes of the same kind as ``w``'s, multiplied on 8-bit tensor cores; the output is then in
    ``out_dtype``. With ``src`` (``[S]`` integers), sorted row ``r`` is ``x[src[r]]`` (and ``x_scale[src[r]]``):
    the kernel reads the rows where they lie, so ``x`` may hold each token once."""
    rows, k = (x.shape[0] if src is None else src.shape[0]), x.shape[1]
    num_experts, n = w.shape[0], w.shape[2]
    out = x.new_empty(rows, n, dtype=out_dtype or x.dtype)
    if rows == 0:
        return out
    kind = 0 if quant is None else quant[2]
    if x_scale is not None:
        if not (kind == 1 and x.dtype == w.dtype or kind == 2 and x.dtype == torch.int8):
            raise ValueError(f"8-bit activations ({x.dtype}) need 8-bit codes of their kind or 4-bit codes with int8 "
                             f"activations (codes {w.dtype}, QUANT {kind})")
        kind = 3 if kind == 1 else 4
    t = Tiles(*tiles) if tiles is not None else grouped_tiles(rows, num_experts, x.dtype, kind)
    if t.subs > 1 and kind not in (2, 4):
        raise ValueError(f"steps of several tiles ({t.subs}) are for 4-bit codes, not QUANT {kind}")
    if kind in (3, 4) and ACT_GROUP.value % t.block_k:
        raise ValueError(f"8-bit activations need tiles within {ACT_GROUP.value} inputs, not {t.block_k}")
    scale, group, _ = _quant_args(quant, w, t.block_k, k)
    fp8 = w.dtype == torch.float8_e4m3fn
    x_scale = scale if x_scale is None else x_scale
    n_blocks = triton.cdiv(n, t.block_n)
    # a tiled launch's static bound on row blocks: each expert's last block may be partial
    grid = ((triton.cdiv(rows, t.block_m) + num_experts) * n_blocks,) if t.tiled else (num_experts, n_blocks)
    wrap_triton(_grouped_mm_kernel)[grid](
        x, w, out, offsets, scale, x_scale, offsets if src is None else src, num_experts, n, k, w.shape[1], group,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        scale.stride(0), scale.stride(1), scale.stride(2), x_scale.stride(0), x_scale.stride(1),
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, IEEE=x.dtype == torch.float32, QUANT=kind, FP8=fp8,
        SWAP=t.swap, PTX=_ptx(), TILED=t.tiled, BLOCK_E=max(16, triton.next_power_of_2(num_experts)), GATHER=src is not None,
        SUBS=t.subs, num_warps=t.warps, num_stages=t.stages,
    )
    return out


def _ptx() -> bool:
    """Whether kernels may run inline PTX: compiled for a GPU, not run by Triton's interpreter (``TRITON_INTERPRET``)."""
    return os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


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


# tl.dot, in full fp32 precision (not TF32) where IEEE
@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _nibbles(byte, dtype: tl.constexpr, PTX: tl.constexpr):
    """The two signed 4-bit codes of each byte (low nibble: the even input), offset 8 removed, in ``dtype``. No
    integer-to-float conversion (a quarter-rate instruction on Hopper): a nibble ``c`` put in the low mantissa
    bits of ``2^23`` is the float ``2^23 + c`` exactly, and subtracting ``2^23 + 8`` leaves ``c - 8``. With
    ``PTX`` (a GPU, not Triton's interpreter) the same trick runs on pairs: :func:`_nibbles_bf16x2`."""
    if PTX:
        low, high = _nibbles_bf16x2(byte)
    else:
        word = byte.to(tl.int32)
        low = ((word & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
        high = (((word >> 4) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
    return low.to(dtype), high.to(dtype)


@triton.jit
def _nibbles_bf16x2(byte):
    """:func:`_nibbles` in bf16, two codes an instruction: four bytes at a time, ``prmt`` spreads two of them to
    the two halves of a word (the bytes shifted right by 4 first for the high nibbles), one ``lop3`` ORs their
    nibbles into the mantissas of bf16 ``128`` (``128 + c``: the ulp there is 1) and one packed ``fma`` removes
    the magic number and the offset (``c - 8``). 13 instructions per 8 codes where the float32 form takes about
    40. The low and the high nibbles are two operations of one result each: Triton then moves each one's layout
    change for the tensor cores onto its codes (a register shuffle of bytes), where Triton 3.8 wrote a two-result
    operation's second result to shared memory in bf16 and read it back (16 KB a step of a decode tile)."""
    return _nibble_bf16x2(byte, False), _nibble_bf16x2(byte, True)


@triton.jit
def _nibble_codes(byte, HIGH: tl.constexpr, PTX: tl.constexpr):
    """The low (or ``HIGH``) 4-bit code ``c`` of each byte as the int8 ``16 (c - 8)``, for int8 tensor cores: the
    nibble moved to the byte's top bits, its top bit flipped (``c - 8`` in two's complement, times 16). With
    ``PTX``, one ``lop3`` a word of four codes (and a shift for the low nibbles): no sign extension, no offset
    left to subtract after the product."""
    if PTX:
        if HIGH:
            asm: tl.constexpr = "lop3.b32 $0, $1, 0xF0F0F0F0, 0x80808080, 0x6A;"
        else:
            asm: tl.constexpr = "{ .reg .b32 t; shl.b32 t, $1, 4; lop3.b32 $0, t, 0xF0F0F0F0, 0x80808080, 0x6A; }"
        codes = tl.inline_asm_elementwise(asm=asm, constraints="=r,r", args=[byte], dtype=tl.int8, is_pure=True, pack=4)
    else:
        top = byte & 0xF0 if HIGH else (byte << 4) & 0xF0
        codes = (top ^ 0x80).to(tl.int8, bitcast=True)
    return codes


@triton.jit
def _nibble_bf16x2(byte, HIGH: tl.constexpr):
    """The low (or ``HIGH``) nibble of each byte in bf16, as :func:`_nibbles_bf16x2` says."""
    if HIGH:
        shift: tl.constexpr = "shr.b32 src, $2, 4;"
    else:
        shift: tl.constexpr = "mov.b32 src, $2;"
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 t0, t1, src, zero, one, bias;
        mov.b32 zero, 0;
        mov.b32 one, 0x3F803F80;
        mov.b32 bias, 0xC308C308;
        """ + shift + """
        prmt.b32 t0, src, zero, 0x4140;
        prmt.b32 t1, src, zero, 0x4342;
        lop3.b32 $0, t0, 0x000F000F, 0x43004300, 0xEA;
        lop3.b32 $1, t1, 0x000F000F, 0x43004300, 0xEA;
        fma.rn.bf16x2 $0, $0, one, bias;
        fma.rn.bf16x2 $1, $1, one, bias;
        }
        """,
        constraints="=r,=r,r",
        args=[byte],
        dtype=tl.bfloat16,
        is_pure=True,
        pack=4,
    )


@triton.jit
def _routed_gemv_kernel(
    x_ptr, w_ptr, ids_ptr, out_ptr, scale_ptr,
    N, K, KW, ROWS_PER_X, GROUP,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_om, stride_on, stride_se, stride_sn, stride_sg,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, QUANT: tl.constexpr, PTX: tl.constexpr,
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
            # even and odd inputs (their codes share a byte), split from one contiguous load
            x = tl.load(x_row + (k0 + ks) * stride_xk, mask=k0 + ks < K, other=0.0).to(tl.float32)
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_K // 2, 2)))
            byte = tl.load(w_base + (k0 // 2 + halves)[None, :] * stride_wk, mask=col_ok[:, None] & (k0 // 2 + halves < KW)[None, :], other=0)
            low, high = _nibbles(byte, tl.float32, PTX)
            part = tl.sum(low * x_even[None, :], axis=1) + tl.sum(high * x_odd[None, :], axis=1)
        else:
            k_ok = k0 + ks < K
            x = tl.load(x_row + (k0 + ks) * stride_xk, mask=k_ok, other=0.0).to(tl.float32)
            w_ok = col_ok[:, None] & k_ok[None, :]
            if QUANT == 0:
                w = tl.load(w_base + (k0 + ks)[None, :] * stride_wk, mask=w_ok, other=0.0)
            else:
                w = _codes(w_base + (k0 + ks)[None, :] * stride_wk, w_ok)
            part = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        if QUANT == 0:
            acc += part
        else:
            acc += part * tl.load(scale_ptr + expert * stride_se + cols * stride_sn + (k0 // GROUP) * stride_sg, mask=col_ok, other=0.0)
    tl.store(out_ptr + pair.to(tl.int64) * stride_om + cols * stride_on, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


GemvTiles = tuple[int, int, int]
"""(BLOCK_N, BLOCK_K, num_warps) of one ``triton_routed_gemv`` launch."""


def gemv_tiles(w: torch.Tensor, quant: Quantized | None) -> GemvTiles:
    """Dense 16-bit weights: 16 columns a program, 128 inputs a step, 8 warps, the fastest of a grid at one
    token on an H200 with weights not in L2 (``decode_kernels.py``: 15.5 against 26.9 us for Qwen3-30B-A3B's up
    projection at 32 x 256 x 4, 8.7 against 10.1 for the down one); fp32: 32 columns, 128 inputs, 4 warps (not
    swept). Quantized codes take 128 inputs a step (a step lies in one scale group) and the shapes fastest at one
    token on an H200 (``experts_kernels.py --sweep-quantized``): FP8 64 columns and 8 warps, int8 32 and 4, int4
    16 and 4."""
    if quant is None:
        return (16, 128, 8) if w.element_size() <= 2 else (32, 128, 4)
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
        x, w, ids, out, scale, n, k, w.shape[1], rows_per_x, group,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        scale.stride(0), scale.stride(1), scale.stride(2),
        BLOCK_N=block_n, BLOCK_K=block_k, QUANT=kind, PTX=_ptx(), num_warps=warps,
    )
    return out


@triton.jit
def _topk_rows_kernel(x_ptr, val_ptr, idx_ptr, N, stride_xm, stride_vm, stride_im, K: tl.constexpr, BLOCK: tl.constexpr,
                      PICKS: tl.constexpr, SOFTMAX: tl.constexpr, NORMALIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    avail = cols < N
    x = tl.load(x_ptr + row * stride_xm + cols, mask=avail, other=0.0).to(tl.float32)
    if SOFTMAX:
        e = tl.where(avail, tl.exp(x - tl.max(tl.where(avail, x, float("-inf")), axis=0)), 0.0)
        x = e / tl.sum(e, axis=0)
    key = tl.where(x != x, float("inf"), x)  # NaN ranks first, as in torch.topk
    slots = tl.arange(0, PICKS)
    values = tl.zeros((PICKS,), dtype=tl.float32)
    indices = tl.zeros((PICKS,), dtype=tl.int64)
    for j in tl.static_range(K):
        best = tl.max(tl.where(avail, key, float("-inf")), axis=0)
        pick = tl.min(tl.where(avail & (key == best), cols, BLOCK), axis=0)
        values = tl.where(slots == j, tl.sum(tl.where(cols == pick, x, 0.0), axis=0), values)
        indices = tl.where(slots == j, pick.to(tl.int64), indices)
        avail = avail & (cols != pick)
    if NORMALIZE:
        values = values / tl.sum(values, axis=0)
    tl.store(val_ptr + row * stride_vm + slots, values.to(val_ptr.dtype.element_ty), mask=slots < K)
    tl.store(idx_ptr + row * stride_im + slots, indices, mask=slots < K)


def triton_topk_rows(x: torch.Tensor, k: int, softmax: bool = False, normalize: bool = False,
                     dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries of each row of ``x [R, N]`` (last dim contiguous) and their indices, largest first,
    ties to the lower index: one program per row holds the row in registers and takes its maximum ``k`` times.
    ``softmax``: of the row's softmax instead (computed in fp32, in the program); ``normalize``: the ``k`` values
    divided by their sum; values in ``dtype`` (default ``x``'s)."""
    rows, n = x.shape
    values = x.new_empty(rows, k, dtype=dtype or x.dtype)
    indices = torch.empty(rows, k, dtype=torch.int64, device=x.device)
    if rows:
        block = triton.next_power_of_2(n)
        wrap_triton(_topk_rows_kernel)[(rows,)](x, values, indices, n, x.stride(0), values.stride(0), indices.stride(0),
                                                K=k, BLOCK=block, PICKS=triton.next_power_of_2(k), SOFTMAX=softmax,
                                                NORMALIZE=normalize, num_warps=1 if block <= 256 else 4)
    return values, indices
