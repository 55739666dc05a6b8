"""Batch-1 decode's small kernels at Qwen3-30B-A3B shapes, on cold weights, side by side in one run (GPU).

At batch 1 a decode step of Qwen3-30B-A3B spends about 100 us a layer where its weight bytes need 27 us
(``docs/benchmarks/scale.md``). This times the kernels that make up that layer, each call on weights not in
L2 (every call of a CUDA graph reads another expert set or another copy of the weight), against the copy
bandwidth measured in the same run:

- ``experts``: the routed GEMV of the up (gate+up) and down projections at top-8, the library's kernel at its
  tiles and over a tile grid, next to ``acc2d``, a variant that keeps a 2-D fp32 tile and reduces it once
  after the loop instead of once per step, and ``glu``, the up projection with SiLU(gate) x up in the same
  program (one output of half the width: no second kernel, no ``[8, 1536]`` round trip);
- ``topk``: the router's top-8 of 128 softmax scores, ``torch.topk`` against ``moe_fx::topk_rows``;
- ``linear``: the attention projections and the router (cuBLAS through ``F.linear``) against the ``acc2d``
  GEMV with one expert, q/k/v fused into one weight too;
- ``attention``: a decode step's attention over a static cache (boolean mask, grouped-query heads), SDPA (cuDNN,
  and whichever backend SDPA picks) against ``moe_fx::decode_attention`` over a grid of tiles and cache splits.

    python benchmarks/decode_kernels.py --out benchmarks/results/decode_kernels_h200.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from experts_kernels import copy_bandwidth, time_calls

from moe_fx.evaluate.table import format_table
from moe_fx.kernels.triton_attention import AttentionTiles, attention_tiles, triton_decode_attention
from moe_fx.kernels.triton_kernels import triton_routed_gemv, triton_topk_rows

HIDDEN, WIDTH, EXPERTS, TOP_K = 2048, 768, 128, 8
HEADS, KV_HEADS, HEAD_DIM = 32, 4, 128


@triton.jit
def _gemv_acc2d_kernel(x_ptr, w_ptr, ids_ptr, out_ptr, N, K, ROWS_PER_X, stride_xm, stride_we, stride_wk, stride_wn, stride_om,
                       HALF, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GLU: tl.constexpr):
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    col_ok = cols < N
    x_row = x_ptr + (pair // ROWS_PER_X).to(tl.int64) * stride_xm
    w_base = w_ptr + expert * stride_we + cols[:, None].to(tl.int64) * stride_wn + ks[None, :] * stride_wk
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + ks < K
        x = tl.load(x_row + k0 + ks, mask=k_ok, other=0.0).to(tl.float32)
        w_ok = col_ok[:, None] & k_ok[None, :]
        acc += tl.load(w_base + k0 * stride_wk, mask=w_ok, other=0.0).to(tl.float32) * x[None, :]
        if GLU:
            acc_up += tl.load(w_base + HALF * stride_wn + k0 * stride_wk, mask=w_ok, other=0.0).to(tl.float32) * x[None, :]
    out = tl.sum(acc, axis=1)
    if GLU:
        out = out / (1.0 + tl.exp(-out)) * tl.sum(acc_up, axis=1)
    tl.store(out_ptr + pair.to(tl.int64) * stride_om + cols, out.to(out_ptr.dtype.element_ty), mask=col_ok)


def gemv_acc2d(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, rows_per_x: int, tiles: tuple[int, int, int], glu: bool = False) -> torch.Tensor:
    """``out[p] = x[p // rows_per_x] @ w[ids[p]]^T`` for ``w [E, N, K]`` (K contiguous); ``glu``: ``N`` is gate then
    up, the output ``silu(gate) * up`` of width ``N / 2``."""
    block_n, block_k, warps = tiles
    n = w.shape[1] // 2 if glu else w.shape[1]
    out = x.new_empty(ids.shape[0], n)
    _gemv_acc2d_kernel[(ids.shape[0], triton.cdiv(n, block_n))](
        x, w, ids, out, n, x.shape[1], rows_per_x, x.stride(0), w.stride(0), w.stride(2), w.stride(1), out.stride(0), n,
        BLOCK_N=block_n, BLOCK_K=block_k, GLU=glu, num_warps=warps)
    return out


GRID = [(bn, bk, w) for bn in (16, 32, 64) for bk in (128, 256, 512) for w in (4, 8) if bn * bk <= 16384]


def experts_rows(tokens: int, g: torch.Generator) -> list[dict]:
    """Each projection: the library kernel (default and grid) and ``acc2d`` over the grid; ``glu`` for the up one."""
    rows = []
    sets = torch.randperm(EXPERTS, device="cuda", generator=g).view(-1, TOP_K)  # 16 disjoint expert sets
    idsets = [s.repeat(tokens) if tokens == 1 else torch.randint(0, EXPERTS, (tokens * TOP_K,), device="cuda", generator=g) for s in sets]
    for proj, (n, k) in {"up": (2 * WIDTH, HIDDEN), "down": (HIDDEN, WIDTH)}.items():
        w = torch.randn(EXPERTS, n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
        x = torch.randn(tokens * (1 if proj == "up" else TOP_K), k, device="cuda", dtype=torch.bfloat16, generator=g)
        rpx = TOP_K if proj == "up" else 1
        distinct = sum(int(i.unique().numel()) for i in idsets) / len(idsets)
        nbytes = distinct * n * k * 2
        ref = torch.stack([x[p // rpx].float() @ w[i].float().T for p, i in enumerate(idsets[0].tolist())])
        cands = {("library", "default"): lambda ids: triton_routed_gemv(x, w.transpose(-2, -1), ids, rpx)}
        cands |= {("library", t): (lambda ids, t=t: triton_routed_gemv(x, w.transpose(-2, -1), ids, rpx, None, t)) for t in GRID}
        cands |= {("acc2d", t): (lambda ids, t=t: gemv_acc2d(x, w, ids, rpx, t)) for t in GRID}
        if proj == "up":
            cands |= {("glu", t): (lambda ids, t=t: gemv_acc2d(x, w, ids, rpx, t, glu=True)) for t in GRID}
        for (kernel, tiles), fn in cands.items():
            try:
                out = fn(idsets[0]).float()
                want = F.silu(ref[:, :WIDTH]) * ref[:, WIDTH:] if kernel == "glu" else ref
                err = ((out - want).abs().max() / want.abs().max()).item()
                us = time_calls([lambda ids=ids: fn(ids) for ids in idsets])
            except Exception as exc:  # a tile shape that does not compile
                rows.append({"part": f"experts {proj}", "tokens": tokens, "kernel": kernel, "tiles": str(tiles), "error": str(exc)[:120]})
                continue
            rows.append({"part": f"experts {proj}", "tokens": tokens, "kernel": kernel, "tiles": str(tiles), "us": us,
                         "GB_s": nbytes / us / 1e3, "rel_err": err})
    return rows


def topk_rows(tokens: int, g: torch.Generator) -> list[dict]:
    """torch's softmax + top-k against softmax + ``moe_fx::topk_rows`` on ``[tokens, 128]`` router logits."""
    logits = [torch.randn(tokens, EXPERTS, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(16)]
    probs = torch.softmax(logits[0], dim=-1, dtype=torch.float)
    want, got = torch.topk(probs, TOP_K, dim=-1), triton_topk_rows(probs, TOP_K)
    same = bool(torch.equal(want.values, got[0]) and torch.equal(want.indices, got[1]))
    rows = []
    for kernel, fn in {"torch.topk": lambda z: torch.topk(torch.softmax(z, -1, dtype=torch.float), TOP_K, dim=-1),
                       "moe_fx::topk_rows": lambda z: triton_topk_rows(torch.softmax(z, -1, dtype=torch.float), TOP_K),
                       "softmax alone": lambda z: torch.softmax(z, -1, dtype=torch.float)}.items():
        us = time_calls([lambda z=z: fn(z) for z in logits])
        rows.append({"part": "router top-k", "tokens": tokens, "kernel": kernel, "tiles": "", "us": us, "same_as_torch": same})
    return rows


def linear_rows(g: torch.Generator, copies: int = 16) -> list[dict]:
    """cuBLAS against the ``acc2d`` GEMV (one expert) at batch 1, on ``copies`` copies of each weight."""
    shapes = {"q": (HEADS * HEAD_DIM, HIDDEN), "k or v": (KV_HEADS * HEAD_DIM, HIDDEN), "o": (HIDDEN, HEADS * HEAD_DIM),
              "router": (EXPERTS, HIDDEN), "qkv fused": ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN)}
    rows = []
    zero = torch.zeros(1, dtype=torch.int64, device="cuda")
    for name, (n, k) in shapes.items():
        ws = [torch.randn(1, n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02 for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16, generator=g)
        nbytes = n * k * 2
        cands = {("cuBLAS", ""): lambda w: F.linear(x, w[0])}
        cands |= {("acc2d", t): (lambda w, t=t: gemv_acc2d(x, w, zero, 1, t)) for t in GRID}
        for (kernel, tiles), fn in cands.items():
            try:
                err = ((fn(ws[0]).float() - F.linear(x.float(), ws[0][0].float())).abs().max()).item()
                us = time_calls([lambda w=w: fn(w) for w in ws])
            except Exception as exc:
                rows.append({"part": f"linear {name}", "tokens": 1, "kernel": kernel, "tiles": str(tiles), "error": str(exc)[:120]})
                continue
            rows.append({"part": f"linear {name}", "tokens": 1, "kernel": kernel, "tiles": str(tiles), "us": us,
                         "GB_s": nbytes / us / 1e3, "abs_err": err})
    return rows


ATTENTION_TILES = [AttentionTiles(*t) for t in ((32, 4, 2), (64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2), (128, 8, 3), (256, 8, 1))]


def attention_rows(batch: int, length: int, g: torch.Generator, parts_grid: list[int | None], copies: int = 4) -> list[dict]:
    """One decode step's attention at Qwen3-30B-A3B's heads over a ``length``-slot static cache of which the last
    16 slots are empty (masked), on ``copies`` copies of the cache."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(batch, 1, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    caches = [(torch.randn(batch, KV_HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g),
               torch.randn(batch, KV_HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)) for _ in range(copies)]
    mask = torch.ones(batch, 1, 1, length, dtype=torch.bool, device="cuda")
    mask[..., length - 16:] = False
    scale = HEAD_DIM ** -0.5
    want = F.scaled_dot_product_attention(q.float(), caches[0][0].float(), caches[0][1].float(), attn_mask=mask, scale=scale, enable_gqa=True)

    def sdpa(kv, backends=None):
        with sdpa_kernel(backends) if backends else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q, *kv, attn_mask=mask, scale=scale, enable_gqa=True)

    cands = {("SDPA cuDNN", ""): lambda kv: sdpa(kv, [SDPBackend.CUDNN_ATTENTION]), ("SDPA", "its pick"): sdpa}
    default = attention_tiles(HEAD_DIM)
    for tiles in ATTENTION_TILES:
        for parts in parts_grid:
            label = "default" if tiles == default and parts is None else f"{tuple(tiles)} parts {parts or 'auto'}"
            cands[("moe_fx::decode_attention", label)] = lambda kv, t=tiles, p=parts: triton_decode_attention(q, *kv, mask[:, 0, 0], scale, t, p)
    nbytes = 2 * batch * KV_HEADS * length * HEAD_DIM * 2
    rows = []
    for (kernel, tiles), fn in cands.items():
        part = f"attention L={length}"
        try:
            err = (fn(caches[0]).float() - want).abs().max().item()
            us = time_calls([lambda kv=kv: fn(kv) for kv in caches])
        except Exception as exc:
            rows.append({"part": part, "tokens": batch, "kernel": kernel, "tiles": tiles, "error": str(exc)[:120]})
            continue
        rows.append({"part": part, "tokens": batch, "kernel": kernel, "tiles": tiles, "us": us, "GB_s": nbytes / us / 1e3, "abs_err": err})
    return rows


def best_per_kernel(rows: list[dict]) -> list[list]:
    """The table: per part, tokens and kernel, the fastest tiles (and the library default's time)."""
    table = []
    keys = dict.fromkeys((r["part"], r["tokens"], r["kernel"]) for r in rows if "us" in r)
    for part, tokens, kernel in keys:
        group = [r for r in rows if "us" in r and (r["part"], r["tokens"], r["kernel"]) == (part, tokens, kernel)]
        best = min(group, key=lambda r: r["us"])
        dflt = next((r for r in group if r["tiles"] == "default"), None)
        table.append([part, tokens, kernel, best["tiles"], f"{best['us']:.2f}", f"{best.get('GB_s', 0):,.0f}" if "GB_s" in best else "-",
                      f"{dflt['us']:.2f}" if dflt else "-"])
    return table


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1])
    ap.add_argument("--parts", nargs="+", default=["experts", "topk", "linear", "attention"], choices=["experts", "topk", "linear", "attention"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[152, 4096], help="attention: static cache slots")
    ap.add_argument("--attention-parts", nargs="+", default=["auto", "2", "4"], help="attention: cache splits tried (auto: the kernel's own)")
    ap.add_argument("--out", default="benchmarks/results/decode_kernels.json")
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows = []
    parts = [None if p == "auto" else int(p) for p in args.attention_parts]
    for tokens in args.tokens:
        rows += (experts_rows(tokens, g) if "experts" in args.parts else []) + (topk_rows(tokens, g) if "topk" in args.parts else [])
        rows += [r for length in args.lengths for r in attention_rows(tokens, length, g, parts)] if "attention" in args.parts else []
    rows += linear_rows(g) if "linear" in args.parts else []
    print(format_table(["part", "tokens", "kernel", "best tiles", "us", "GB/s", "default us"], best_per_kernel(rows),
                       title="batch-1 decode kernels, cold weights"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                                          "copy_bandwidth_bytes_per_s": bandwidth, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
