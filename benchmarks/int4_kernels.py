"""int4 experts with 16-64 tokens: why the library's kernels read 0.65-0.77 TB/s, and what reads faster (GPU).

Compiled for Hopper, the library's int4 grouped kernel loads its codes synchronously: Triton's software
pipeliner prefetches loads that feed ``tl.dot`` through shared memory, and the 4-bit codes reach the dot
through an unpacking step, so every step of the loop waits for its bytes. This times, at Qwen3-30B-A3B shapes
(128 experts, top-8, up and down projections), side by side in one run:

- ``lib grouped`` / ``lib gemv``: the library's kernels at their default tiles (and bf16 weights, for scale);
- ``prefetch``: the grouped kernel with the next step's codes, activations and scales loaded before this
  step's product (one step of latency hidden in registers);
- ``stages``: the grouped kernel with the loop marked ``tl.range(num_stages=S)`` (the pipeliner's own choice);
- ``gemv prefetch``: the routed GEMV (one program per routed pair) with the same prefetch and a 2-D
  accumulator reduced once.

    python benchmarks/int4_kernels.py --out benchmarks/results/quantize/int4_kernels_h200.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
import triton.language as tl
from experts_kernels import copy_bandwidth, time_call

from moe_fx.evaluate.table import format_table
from moe_fx.kernels.quantized import quantize
from moe_fx.kernels.triton_kernels import _mma, _nibbles, _ptx, gemv_tiles, triton_grouped_mm, triton_routed_gemv

HIDDEN, WIDTH, EXPERTS, TOP_K = 2048, 768, 128, 8


@triton.jit
def _grouped_int4_kernel(x_ptr, w_ptr, out_ptr, offsets_ptr, scale_ptr, N, K, GROUP,
                         stride_xm, stride_we, stride_wk, stride_wn, stride_om, stride_se, stride_sn, stride_sg,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr,
                         STAGES: tl.constexpr, PTX: tl.constexpr):
    """The library's ``QUANT`` 2 grouped kernel (unswapped; ``K`` a multiple of ``BLOCK_K``) with its loads
    prefetched one step ahead (``PREFETCH``) or its loop pipelined by Triton (``STAGES``)."""
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
    w_base = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wn + halves[:, None] * stride_wk
    s_base = scale_ptr + expert.to(tl.int64) * stride_se + cols * stride_sn
    for row0 in range(start, end, BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        x_base = x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if PREFETCH:
            byte = tl.load(w_base, mask=(halves >= 0)[:, None] & col_ok[None, :], other=0)
            a = tl.load(x_base, mask=row_ok[:, None] & (ks >= 0)[None, :], other=0.0)
            s = tl.load(s_base, mask=col_ok, other=0.0)
            for k0 in range(BLOCK_K, K + BLOCK_K, BLOCK_K):
                byte_next = tl.load(w_base + (k0 // 2) * stride_wk, mask=(k0 + 2 * halves < K)[:, None] & col_ok[None, :], other=0)
                a_next = tl.load(x_base + k0, mask=row_ok[:, None] & (k0 + ks < K)[None, :], other=0.0)
                s_next = tl.load(s_base + (k0 // GROUP) * stride_sg, mask=col_ok & (cols * 0 + k0 < K), other=0.0)
                a_even, a_odd = tl.split(tl.reshape(a, (BLOCK_M, BLOCK_K // 2, 2)))
                low, high = _nibbles(byte, a_even.dtype, PTX)
                acc += (_mma(a_even, low, False, False, False, False) + _mma(a_odd, high, False, False, False, False)) * s[None, :]
                byte, a, s = byte_next, a_next, s_next
        else:
            for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
                byte = tl.load(w_base + (k0 // 2) * stride_wk, mask=(halves >= 0)[:, None] & col_ok[None, :], other=0)
                a = tl.load(x_base + k0, mask=row_ok[:, None] & (ks >= 0)[None, :], other=0.0)
                s = tl.load(s_base + (k0 // GROUP) * stride_sg, mask=col_ok, other=0.0)
                a_even, a_odd = tl.split(tl.reshape(a, (BLOCK_M, BLOCK_K // 2, 2)))
                low, high = _nibbles(byte, a_even.dtype, PTX)
                acc += (_mma(a_even, low, False, False, False, False) + _mma(a_odd, high, False, False, False, False)) * s[None, :]
        tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


def grouped_int4(x, w, offsets, scale, tiles, prefetch: bool, stages: int):
    block_m, block_n, block_k, warps = tiles
    n, k = w.shape[2], x.shape[1]
    out = x.new_empty(x.shape[0], n)
    _grouped_int4_kernel[(w.shape[0], triton.cdiv(n, block_n))](
        x, w, out, offsets, scale, n, k, 128, x.stride(0), w.stride(0), w.stride(1), w.stride(2), out.stride(0),
        scale.stride(0), scale.stride(1), scale.stride(2),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PREFETCH=prefetch, STAGES=stages, PTX=_ptx(), num_warps=warps)
    return out


@triton.jit
def _gemv_int4_kernel(x_ptr, w_ptr, ids_ptr, out_ptr, scale_ptr, N, K, ROWS_PER_X, GROUP,
                      stride_xm, stride_we, stride_wk, stride_wn, stride_om, stride_se, stride_sn, stride_sg,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PTX: tl.constexpr):
    """The library's ``QUANT`` 2 routed GEMV with its loads one step ahead and a 2-D accumulator."""
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    halves = tl.arange(0, BLOCK_K // 2)
    col_ok = cols < N
    x_row = x_ptr + (pair // ROWS_PER_X).to(tl.int64) * stride_xm + ks
    w_base = w_ptr + expert * stride_we + cols[:, None].to(tl.int64) * stride_wn + halves[None, :] * stride_wk
    s_base = scale_ptr + expert * stride_se + cols * stride_sn
    acc = tl.zeros((BLOCK_N, BLOCK_K // 2), dtype=tl.float32)
    byte = tl.load(w_base, mask=col_ok[:, None] & (halves >= 0)[None, :], other=0)
    x = tl.load(x_row).to(tl.float32)
    s = tl.load(s_base, mask=col_ok, other=0.0)
    for k0 in range(BLOCK_K, K + BLOCK_K, BLOCK_K):
        byte_next = tl.load(w_base + (k0 // 2) * stride_wk, mask=col_ok[:, None] & (k0 + 2 * halves < K)[None, :], other=0)
        x_next = tl.load(x_row + k0, mask=k0 + ks < K, other=0.0).to(tl.float32)
        s_next = tl.load(s_base + (k0 // GROUP) * stride_sg, mask=col_ok & (cols * 0 + k0 < K), other=0.0)
        x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_K // 2, 2)))
        low, high = _nibbles(byte, tl.float32, PTX)
        acc += (low * x_even[None, :] + high * x_odd[None, :]) * s[:, None]
        byte, x, s = byte_next, x_next, s_next
    tl.store(out_ptr + pair.to(tl.int64) * stride_om + cols, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=col_ok)


def gemv_int4(x, w, ids, rows_per_x, scale, tiles):
    block_n, block_k, warps = tiles
    n, k = w.shape[2], x.shape[1]
    out = x.new_empty(ids.shape[0], n)
    _gemv_int4_kernel[(ids.shape[0], triton.cdiv(n, block_n))](
        x, w, ids, out, scale, n, k, rows_per_x, 128, x.stride(0), w.stride(0), w.stride(1), w.stride(2), out.stride(0),
        scale.stride(0), scale.stride(1), scale.stride(2), BLOCK_N=block_n, BLOCK_K=block_k, PTX=_ptx(), num_warps=warps)
    return out


GROUPED_TILES = [(bm, bn, 128, w) for bm in (16, 32) for bn in (32, 64, 128) for w in (4, 8)]
GEMV_TILES = [(bn, 128, w) for bn in (16, 32, 64) for w in (2, 4, 8)] + [(bn, 256, w) for bn in (16, 32) for w in (4, 8)]


def rows_for(tokens: int, g: torch.Generator):
    ids = torch.randn(tokens, EXPERTS, device="cuda", generator=g).topk(TOP_K, dim=-1).indices.reshape(-1)
    sorted_ids = ids.sort().values
    offsets = torch.searchsorted(sorted_ids, torch.arange(EXPERTS, device="cuda"), right=True).to(torch.int32)
    return ids, offsets, int(ids.unique().numel())


def projection_rows(proj: str, n: int, k: int, tokens: int, g: torch.Generator) -> list[dict]:
    dense = torch.randn(EXPERTS, n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    codes, scale = quantize(dense, "int4-group")
    w, wd = codes.transpose(-2, -1), dense.transpose(-2, -1)
    quant = (scale, 128, 2)
    ids, offsets, distinct = rows_for(tokens, g)
    rows_per_x = TOP_K if proj == "up" else 1
    x = torch.randn(tokens * TOP_K // rows_per_x, k, device="cuda", dtype=torch.bfloat16, generator=g)
    rows = torch.randn(tokens * TOP_K, k, device="cuda", dtype=torch.bfloat16, generator=g)
    int4_bytes = distinct * (n * k // 2 + scale[0].numel() * 4)
    bf16_bytes = distinct * n * k * 2
    ref_grouped = triton_grouped_mm(rows, w, offsets, quant=quant).float()
    ref_gemv = triton_routed_gemv(x, w, ids, rows_per_x, quant).float()
    cands = [("bf16", "lib grouped", "default", lambda: triton_grouped_mm(rows, wd, offsets), None),
             ("bf16", "lib gemv", "default", lambda: triton_routed_gemv(x, wd, ids, rows_per_x), None),
             ("int4", "lib grouped", "default", lambda: triton_grouped_mm(rows, w, offsets, quant=quant), ref_grouped),
             ("int4", "lib gemv", str(gemv_tiles(w, quant)), lambda: triton_routed_gemv(x, w, ids, rows_per_x, quant), ref_gemv)]
    for t in GROUPED_TILES:
        cands.append(("int4", "prefetch", str(t), lambda t=t: grouped_int4(rows, w, offsets, scale, t, True, 1), ref_grouped))
        for stages in (3, 4):
            cands.append(("int4", f"stages={stages}", str(t), lambda t=t, s=stages: grouped_int4(rows, w, offsets, scale, t, False, s), ref_grouped))
    for t in GEMV_TILES:
        cands.append(("int4", "gemv prefetch", str(t), lambda t=t: gemv_int4(x, w, ids, rows_per_x, scale, t), ref_gemv))
    out = []
    for weights, kernel, tiles, fn, ref in cands:
        row = {"proj": proj, "tokens": tokens, "weights": weights, "kernel": kernel, "tiles": tiles}
        try:
            err = None if ref is None else (fn().float() - ref).abs().max().item() / ref.abs().max().item()
            us = time_call(fn, calls=10, replays=5)
        except Exception as exc:  # a tile shape that does not compile (registers, shared memory)
            out.append(row | {"error": str(exc)[:160]})
            continue
        nbytes = bf16_bytes if weights == "bf16" else int4_bytes
        out.append(row | {"us": us, "TB_s": nbytes / us / 1e6, "rel_err_vs_lib": err})
    return out


def best(rows: list[dict]) -> list[list]:
    table = []
    for key in dict.fromkeys((r["proj"], r["tokens"], r["weights"], r["kernel"]) for r in rows):
        ok = [r for r in rows if (r["proj"], r["tokens"], r["weights"], r["kernel"]) == key and "us" in r]
        if ok:
            b = min(ok, key=lambda r: r["us"])
            err = "" if b["rel_err_vs_lib"] is None else f"{b['rel_err_vs_lib']:.1e}"
            table.append([*key, b["tiles"], f"{b['us']:.1f}", f"{b['TB_s']:.2f}", err])
    return table


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--out", default="benchmarks/results/quantize/int4_kernels_h200.json")
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    bandwidth = copy_bandwidth()
    rows = []
    for tokens in args.tokens:
        for proj, (n, k) in {"up": (2 * WIDTH, HIDDEN), "down": (HIDDEN, WIDTH)}.items():
            rows += projection_rows(proj, n, k, tokens, g)
    table = best(rows)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, triton {triton.__version__}")
    print(format_table(["proj", "tokens", "weights", "kernel", "best tiles", "us", "TB/s", "rel err"], table))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                                          "copy_TB_s": bandwidth / 1e12, "best": table, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
