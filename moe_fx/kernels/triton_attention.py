"""The Triton kernel of ``moe_fx::decode_attention`` (CUDA; imported only where Triton is): one query token per
row against a KV cache, every query head of a grouped-query group in one program.

Program ``(b * Hkv + h, s)`` loads the ``G = Hq / Hkv`` query heads that share key/value head ``h`` (one
``[G, D]`` tile, padded to 16 rows for the tensor cores), streams split ``s`` of the cache ``BLOCK_L`` slots at
a time with an online softmax in fp32, and writes the normalized output, or, where the cache is split
(:func:`splits` > 1: long caches with few rows and heads), its partial maximum, sum and weighted values for
:func:`_combine_kernel`. The keys, values and mask of a block are loaded independently of each other (the mask
applies to the scores), so Triton's pipeline issues the next blocks' loads while one is computed: at batch 1 a
program's time is the latency of its loads, not their bytes."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from moe_fx.kernels.triton_kernels import dot


class AttentionTiles(NamedTuple):
    """One launch's shape: cache slots a step of the loop, warps, pipeline stages."""

    block: int
    warps: int
    stages: int


MIN_SLOTS_PER_SPLIT = 128
"""A cache is split only into parts of at least this many slots: a short cache in one pass needs no second
kernel (at batch 1 a launch costs about what reading a few hundred slots does)."""


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, part_ptr, stats_ptr, L, SPLIT_LEN,
                             stride_qb, stride_qh, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
                             stride_mb, stride_ml, HKV, SPLITS,
                             G: tl.constexpr, G_PAD: tl.constexpr, DK: tl.constexpr, DK_PAD: tl.constexpr,
                             DV: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_L: tl.constexpr, MASK: tl.constexpr,
                             PARTIAL: tl.constexpr, IEEE: tl.constexpr, SCALE: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // HKV).to(tl.int64)
    h = (pid % HKV).to(tl.int64)
    rows = tl.arange(0, G_PAD)
    dk = tl.arange(0, DK_PAD)
    dv = tl.arange(0, DV_PAD)
    heads = h * G + rows
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + dk[None, :],
                mask=(rows[:, None] < G) & (dk[None, :] < DK), other=0.0)
    m_i = tl.full((G_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, DV_PAD), tl.float32)
    start = split * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, L)
    for first in range(0, SPLIT_LEN, BLOCK_L):
        slots = start + first + tl.arange(0, BLOCK_L)
        inside = slots < end
        k = tl.load(k_ptr + b * stride_kb + h * stride_kh + slots[:, None] * stride_kl + dk[None, :],
                    mask=inside[:, None] & (dk[None, :] < DK), other=0.0)
        v = tl.load(v_ptr + b * stride_vb + h * stride_vh + slots[:, None] * stride_vl + dv[None, :],
                    mask=inside[:, None] & (dv[None, :] < DV), other=0.0)
        valid = inside
        if MASK == 1:
            valid = valid & (tl.load(mask_ptr + b * stride_mb + slots * stride_ml, mask=inside, other=0) != 0)
        s = dot(q, tl.trans(k), IEEE)
        s = s * (SCALE * 1.4426950408889634)  # a compile-time float: Inductor passes runtime floats as fp64
        if MASK == 2:
            bias = tl.load(mask_ptr + b * stride_mb + slots * stride_ml, mask=inside, other=0.0).to(tl.float32)
            s = s + bias[None, :] * 1.4426950408889634
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing to attend to so far
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    keep = (rows[:, None] < G) & (dv[None, :] < DV)
    if PARTIAL:
        row_ids = (b * HKV * G + heads) * SPLITS + split
        tl.store(part_ptr + row_ids[:, None] * DV + dv[None, :], acc, mask=keep)
        tl.store(stats_ptr + row_ids * 2, m_i, mask=rows < G)
        tl.store(stats_ptr + row_ids * 2 + 1, l_i, mask=rows < G)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a row that attends to nothing gets zeros
        tl.store(out_ptr + (b * HKV * G + heads)[:, None] * DV + dv[None, :], out.to(out_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _combine_kernel(part_ptr, stats_ptr, out_ptr, SPLITS, DV: tl.constexpr, DV_PAD: tl.constexpr,
                    SPLITS_PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    parts = tl.arange(0, SPLITS_PAD)
    dv = tl.arange(0, DV_PAD)
    have = parts < SPLITS
    m = tl.load(stats_ptr + (row * SPLITS + parts) * 2, mask=have, other=float("-inf"))
    sums = tl.load(stats_ptr + (row * SPLITS + parts) * 2 + 1, mask=have, other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(have, tl.exp2(m - m_max), 0.0)
    acc = tl.load(part_ptr + (row * SPLITS + parts)[:, None] * DV + dv[None, :], mask=have[:, None] & (dv[None, :] < DV), other=0.0)
    total = tl.sum(sums * w, axis=0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + row * DV + dv, out.to(out_ptr.dtype.element_ty), mask=dv < DV)


def splits(batch_kv_heads: int, length: int, processors: int) -> int:
    """How many parts the cache is split into: enough programs for two per multiprocessor, none shorter than
    :data:`MIN_SLOTS_PER_SPLIT` slots."""
    most = max(1, length // MIN_SLOTS_PER_SPLIT)
    wanted = max(1, -(-2 * processors // batch_kv_heads))
    return min(most, wanted)


def split_length(length: int, parts: int, block: int) -> int:
    """Slots per part for about ``parts`` parts, rounded up to whole blocks so that no block straddles two parts
    (the launch then has ``ceil(length / split_length)`` parts, at most ``parts``)."""
    per_split = -(-length // parts)
    return -(-per_split // block) * block


def _padded(n: int) -> int:
    """A tile dimension holding ``n``: a power of two, at least 16 (``tl.dot``'s smallest)."""
    return max(16, triton.next_power_of_2(n))


def attention_tiles(head_dim: int) -> AttentionTiles:
    """64 slots a step for heads up to 128 wide, 32 for wider (the key and value tiles stay in registers)."""
    return AttentionTiles(64, 4, 3) if head_dim <= 128 else AttentionTiles(32, 4, 3)


def triton_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                            scale: float, tiles: AttentionTiles | None = None, parts: int | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` for ``q [B, Hq, 1, Dk]``, ``k [B, Hkv, L, Dk]``, ``v [B, Hkv, L, Dv]``
    (last dimensions contiguous, ``Hq`` a multiple of ``Hkv``) and ``mask`` ``None`` or ``[B | 1, L]`` (boolean:
    True attends; floating: added to the scores). Returns ``[B, Hq, 1, Dv]`` in ``q``'s dtype. ``tiles`` and
    ``parts`` (the cache's split) override :func:`attention_tiles` and :func:`splits` (benchmarks)."""
    batch, hq, _, dk = q.shape
    hkv, length, dv = k.shape[1], k.shape[2], v.shape[-1]
    group = hq // hkv
    out = q.new_empty(batch, hq, 1, dv)
    if batch == 0 or length == 0:
        return out.zero_()
    tiles = tiles or attention_tiles(max(dk, dv))
    processors = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
    split_len = split_length(length, parts or splits(batch * hkv, length, processors), tiles.block)
    count = -(-length // split_len)
    kind = 0 if mask is None else 1 if mask.dtype == torch.bool else 2
    mask_arg = q if mask is None else mask
    stride_mb = 0 if mask is None or mask.shape[0] == 1 else mask.stride(0)
    stride_ml = 0 if mask is None else mask.stride(1)
    partial = count > 1
    part = q.new_empty(batch * hq * count, dv, dtype=torch.float32) if partial else out
    stats = q.new_empty(batch * hq * count, 2, dtype=torch.float32) if partial else out
    ieee = q.dtype == torch.float32
    wrap_triton(_decode_attention_kernel)[(batch * hkv, count)](
        q, k, v, mask_arg, out, part, stats, length, split_len,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        stride_mb, stride_ml, hkv, count,
        G=group, G_PAD=_padded(group), DK=dk, DK_PAD=_padded(dk), DV=dv, DV_PAD=_padded(dv), BLOCK_L=tiles.block, MASK=kind, PARTIAL=partial, IEEE=ieee,
        SCALE=float(scale), num_warps=tiles.warps, num_stages=tiles.stages)
    if partial:
        wrap_triton(_combine_kernel)[(batch * hq,)](part, stats, out, count, DV=dv, DV_PAD=_padded(dv),
                                                    SPLITS_PAD=triton.next_power_of_2(count), num_warps=1)
    return out
