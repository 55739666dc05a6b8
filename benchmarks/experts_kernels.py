"""One experts call at Qwen3-30B-A3B shapes (128 experts, top-8, width 768, hidden 2048, bf16): microseconds
per call and effective weight bandwidth of each experts implementation, side by side in one run (GPU).

Each call is captured in a CUDA graph (20 calls a graph, replayed; launch overhead is not what is measured)
and timed with CUDA events. ``bytes`` is what the call must read at least: the distinct experts its routing
hits times one expert's bytes; ``GB/s`` divides that by the time, to compare with the device-to-device copy
bandwidth measured in the same run. Routing: the top-8 of random router logits (uniform-ish loads).

    python benchmarks/experts_kernels.py --out benchmarks/results/experts_kernels.json

``--sweep-tiles`` times the Triton grouped kernel alone, one projection at a time, over a grid of tile shapes
for each (experts, tokens) pair, next to torch's native grouped GEMM: the data behind
``triton_kernels.grouped_tiles``.

``--sweep-quantized`` does the same for quantized experts (``moe_fx.kernels.quantized``: fp8-block,
int8-channel, int4-group, next to bf16): both Triton kernels (the routed GEMV of decode, the grouped kernel),
each over its tile grid; ``GB/s`` counts the codes and scales of the distinct experts hit: the data behind
``gemv_tiles`` / ``grouped_tiles`` for quantized codes. ``grouped-a8`` rows (FP8, int8) quantize the rows to
8 bits first and multiply on 8-bit tensor cores (``quantized_ops.activations_8bit``); their time includes that.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from transformers import Qwen3MoeConfig
from transformers.integrations.moe import batched_mm_experts_forward, grouped_mm_experts_forward
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from moe_fx.evaluate.table import format_table
from moe_fx.kernels import moe_fx_experts_forward

IMPLS = {
    "grouped_mm (stock)": (grouped_mm_experts_forward, "auto"),
    "batched_mm (stock)": (batched_mm_experts_forward, "auto"),
    "moe_fx": (moe_fx_experts_forward, "auto"),
    "moe_fx (triton grouped)": (moe_fx_experts_forward, "triton"),
}
BATCHED_MM_MAX_TOKENS = 64
"""batched_mm copies one expert's weights per (token, slot): 64 tokens x 8 already gathers 2.4 GB."""


def copy_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy (read + write counted), the bandwidth ceiling."""
    src = torch.empty(2**30, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * src.numel() * src.element_size() * 10 / (start.elapsed_time(end) / 1000)


def time_call(fn, calls: int = 20, replays: int = 10) -> float:
    """Microseconds per ``fn()``, replayed in a CUDA graph."""
    return time_calls([fn] * calls, replays)


def time_calls(calls: list, replays: int = 10) -> float:
    """Microseconds per call of ``calls`` (each may read its own inputs), captured once in a CUDA graph and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls[:3]:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (len(calls) * replays)


SWEEP_TILES = [(bm, bn, bk, w, st, sw) for bm in (16, 32) for bn in (32, 64, 128) for bk in (64, 128, 256)
               for w, st in ((4, 3), (4, 4), (8, 3)) for sw in (False, True) if not (bm == 32 and bk == 256)]
"""(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, SWAP) tried by ``--sweep-tiles``."""


def routed_rows(tokens: int, num_experts: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``tokens x 8`` routed pairs (top-8 of random logits): their expert ids in token order, the offsets of the
    rows sorted by expert, and the distinct experts hit."""
    ids = torch.randn(tokens, num_experts, device="cuda", generator=g).topk(8, dim=-1).indices.reshape(-1)
    offsets = torch.searchsorted(ids.sort().values, torch.arange(num_experts, device="cuda"), right=True).to(torch.int32)
    return ids, offsets, int(ids.unique().numel())


def sweep_tiles(args) -> list[dict]:
    """Microseconds of one grouped matmul per tile shape (Qwen3-30B-A3B's up and down projections)."""
    from moe_fx.kernels.grouped_mm import _native_function
    from moe_fx.kernels.triton_kernels import grouped_tiles, triton_grouped_mm

    g = torch.Generator(device="cuda").manual_seed(0)
    rows_out = []
    for num_experts in args.sweep_experts:
        for tokens in args.tokens:
            _, offsets, distinct = routed_rows(tokens, num_experts, g)
            for proj, (n, k) in {"up": (1536, 2048), "down": (2048, 768)}.items():
                w = torch.randn(num_experts, n, k, device="cuda", dtype=torch.bfloat16, generator=g).transpose(-2, -1)
                x = torch.randn(tokens * 8, k, device="cuda", dtype=torch.bfloat16, generator=g)
                nbytes = distinct * n * k * 2
                default = grouped_tiles(x.shape[0], num_experts, x.dtype)
                candidates = {"native": lambda: _native_function()(x, w, offs=offsets)}
                tiles = SWEEP_TILES + ([default] if default not in SWEEP_TILES else [])
                candidates |= {str(t): (lambda t=t: triton_grouped_mm(x, w, offsets, t)) for t in tiles}
                ref = candidates["native"]().float()
                problem = []
                for name, fn in candidates.items():
                    row = {"experts": num_experts, "tokens": tokens, "proj": proj, "tiles": name}
                    try:
                        err = (fn().float() - ref).abs().max().item()
                        us = time_call(fn)
                    except Exception as exc:
                        problem.append(row | {"error": str(exc)[:200]})
                        continue
                    problem.append(row | {"us": us, "weight_GB_s": nbytes / us / 1e3, "max_abs_vs_native": err, "default": name == str(default)})
                rows_out += problem
                ok = [r for r in problem if "us" in r]
                best = min(ok, key=lambda r: r["us"])
                dflt = next((r for r in ok if r["default"]), None)
                native = next(r for r in ok if r["tiles"] == "native")
                print(f"E={num_experts:<4} T={tokens:<5} {proj:<5} best {best['tiles']:<24} {best['us']:7.1f} us ({best['weight_GB_s']:5.0f} GB/s)"
                      f"  default {dflt['us'] if dflt else float('nan'):7.1f}  native {native['us']:7.1f}", flush=True)
    return rows_out


QUANT_GEMV_TILES = [(bn, 128, w) for bn in (16, 32, 64, 128) for w in (2, 4, 8)]
"""Routed GEMV tiles tried (128 inputs a step: one scale group)."""
QUANT_GROUPED_FEW = ([(16, 64, 128, 4, 3, False), (16, 128, 128, 4, 3, False), (16, 64, 128, 8, 3, False), (64, 64, 128, 4, 3, False),
                      (64, 128, 128, 8, 3, False)]
                     + [(bm, bn, 128, w, 3, True) for bm in (16, 32, 64) for bn in (64, 128) for w in (4, 8)])
"""Grouped tiles tried with up to 64 tokens (a few rows per expert); 128 inputs a step (the activation group)."""
QUANT_GROUPED_MANY = ([(bm, bn, 128, w, 3, sw) for bm in (64, 128) for bn in (64, 128) for w in (4, 8) for sw in (False, True)]
                      + [(bm, bn, 128, 8, st, False) for bm, bn in ((128, 128), (128, 256), (64, 256)) for st in (3, 4)
                         if (bm, bn, st) != (128, 128, 3)])
"""Grouped tiles tried with more tokens."""


def sweep_quantized(args) -> list[dict]:
    """Microseconds of one projection's routed GEMV and grouped matmul per scheme and tile shape."""
    from moe_fx.kernels.grouped_mm import _native_function
    from moe_fx.kernels.quantized import SCHEMES, quantize
    from moe_fx.kernels.triton_kernels import quantize_rows, triton_grouped_mm, triton_routed_gemv

    g = torch.Generator(device="cuda").manual_seed(0)
    out = []
    num_experts = 128
    for proj, (n, k) in {"up": (1536, 2048), "down": (2048, 768)}.items():
        dense = torch.randn(num_experts, n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
        weights = {"bf16": (dense.transpose(-2, -1), None, dense.numel() * 2)}
        for scheme, spec in SCHEMES.items():
            if scheme not in args.schemes:
                continue
            codes, scale = quantize(dense, scheme)
            weights[scheme] = (codes.transpose(-2, -1), (scale, spec.group_size(k), spec.kernel),
                               codes.numel() * codes.element_size() + scale.numel() * 4)
        for tokens in args.tokens:
            ids, offsets, distinct = routed_rows(tokens, num_experts, g)
            x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, generator=g)
            rows = torch.randn(tokens * 8, k, device="cuda", dtype=torch.bfloat16, generator=g)
            for name, (w, quant, nbytes) in weights.items():
                read = nbytes * distinct / num_experts
                grid = QUANT_GROUPED_FEW if tokens <= 64 else QUANT_GROUPED_MANY
                kinds = {"grouped": [(t, lambda t=t: triton_grouped_mm(rows, w, offsets, t, quant)) for t in grid]}
                if quant is not None and quant[2] == 1:  # 8-bit codes: the rows quantized too (included in the time)
                    def grouped_a8(tiles, fp8=w.dtype == torch.float8_e4m3fn):
                        codes, x_scale = quantize_rows(rows, fp8)
                        return triton_grouped_mm(codes, w, offsets, tiles, quant, x_scale, rows.dtype)

                    kinds["grouped-a8"] = [(t, lambda t=t: grouped_a8(t)) for t in grid]
                if quant is None:
                    kinds["native"] = [("cutlass", lambda: _native_function()(rows, w, offs=offsets))]
                if tokens <= 64:
                    kinds["gemv"] = [(t, lambda t=t: triton_routed_gemv(x, w, ids, 8, quant, t)) for t in QUANT_GEMV_TILES
                                     if quant is None or t[1] <= 128]
                for kind, cands in kinds.items():
                    if args.kernels and kind not in args.kernels:
                        continue
                    timed = []
                    for tiles, fn in cands:
                        try:
                            timed.append((time_call(fn, calls=10, replays=5), tiles))
                        except Exception as exc:  # a tile shape the kernel cannot compile (shared memory)
                            out.append({"proj": proj, "tokens": tokens, "weights": name, "kernel": kind, "tiles": tiles, "error": str(exc)[:120]})
                    us, tiles = min(timed)
                    out.append({"proj": proj, "tokens": tokens, "weights": name, "kernel": kind, "best_tiles": tiles, "us": us,
                                "GB_s": read / us / 1e3, "bytes": read, "all": [[t, u] for u, t in sorted(timed)[:5]]})
                    # grouped tiles end in SWAP: the best of each orientation, side by side
                    sides = {f"swap={sw}": min((u for u, t in timed if t[-1] is sw), default=float("nan")) for sw in (False, True)}
                    sides = "  ".join(f"{k} {v:7.1f}" for k, v in sides.items()) if kind.startswith("grouped") else ""
                    print(f"{proj:<5} T={tokens:<5} {name:<13} {kind:<10} best {str(tiles):<32} {us:8.1f} us {read / us / 1e3:6.0f} GB/s  {sides}", flush=True)
    return out


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 16, 64, 256, 4096])
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/experts_kernels.json")
    ap.add_argument("--sweep-tiles", action="store_true", help="time the Triton grouped kernel's tile shapes instead")
    ap.add_argument("--sweep-experts", type=int, nargs="+", default=[128, 64], help="expert counts of --sweep-tiles")
    ap.add_argument("--sweep-quantized", action="store_true", help="time the quantized kernels' tile shapes instead")
    ap.add_argument("--kernels", nargs="+", choices=["grouped", "grouped-a8", "native", "gemv"],
                    help="kernels of --sweep-quantized (default: all)")
    ap.add_argument("--schemes", nargs="+", default=["fp8-block", "int8-channel", "int4-group"], help="schemes of --sweep-quantized")
    args = ap.parse_args()
    if args.sweep_tiles or args.sweep_quantized:
        rows = sweep_quantized(args) if args.sweep_quantized else sweep_tiles(args)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
        return
    config = Qwen3MoeConfig(hidden_size=2048, moe_intermediate_size=768, num_experts=args.experts, num_experts_per_tok=8)
    experts = Qwen3MoeExperts(config).to("cuda", torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    for p in experts.parameters():
        p.normal_(0.0, 0.02, generator=g)
    expert_bytes = sum(p[0].numel() * p.element_size() for p in experts.parameters())
    bandwidth = copy_bandwidth()
    results = []
    for tokens in args.tokens:
        h = torch.randn(tokens, 2048, device="cuda", dtype=torch.bfloat16, generator=g)
        weights, index = torch.randn(tokens, args.experts, device="cuda", generator=g).softmax(-1).topk(8, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        distinct = int(index.unique().numel())
        reference = grouped_mm_experts_forward(experts, h, index, weights).float()
        for name, (forward, kernel) in IMPLS.items():
            if name.startswith("batched_mm") and tokens > BATCHED_MM_MAX_TOKENS:
                continue
            os.environ["MOE_FX_GROUPED_MM"] = kernel
            try:
                err = (forward(experts, h, index, weights).float() - reference).abs().max().item()
                us = time_call(lambda: forward(experts, h, index, weights))
            except Exception as exc:
                results.append({"tokens": tokens, "impl": name, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                continue
            gbs = distinct * expert_bytes / (us * 1e-6) / 1e9
            results.append({"tokens": tokens, "impl": name, "us": us, "distinct_experts": distinct, "weight_GB_s": gbs,
                            "max_abs_vs_stock": err})
            print(f"T={tokens:<5} {name:<24} {us:9.1f} us  {gbs:7.0f} GB/s  (distinct {distinct}, |diff| {err:.2e})", flush=True)
        os.environ["MOE_FX_GROUPED_MM"] = "auto"
    rows = [[r["tokens"], r["impl"], f"{r['us']:.1f}" if "us" in r else r["error"][:40], f"{r.get('weight_GB_s', 0):.0f}",
             r.get("distinct_experts", ""), f"{r.get('max_abs_vs_stock', 0):.1e}"] for r in results]
    print(format_table(["tokens", "experts implementation", "us / call", "weight GB/s", "distinct", "|diff| vs stock"], rows,
                       title=f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e9:,.0f} GB/s (read + write)"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                          "copy_GB_s": bandwidth / 1e9, "expert_bytes": expert_bytes, "rows": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
