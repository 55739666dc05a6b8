"""Quantized experts kernels at prefill sizes (thousands of tokens) against bf16's CUTLASS grouped GEMM (GPU).

A prefill step through the moe_fx experts gathers each routed (token, slot) pair's hidden state into rows sorted
by expert and multiplies them by their experts' weights, up projection then down. This times each projection
as the forward runs it, at Qwen3-30B-A3B shapes (128 experts, top-8), side by side in one process:

- ``bf16``: the gather, then torch's grouped GEMM (CUTLASS);
- ``before``: the quantized kernel as it ran before the tiled schedule (the gather, the sorted rows quantized
  to 8 bits for FP8 / int8, one program per expert walking its rows);
- ``default``: the kernel as the forward runs it now (:func:`grouped_tiles`' shape, the rows read in place);
- ``weight-only`` (int4): the same with bf16 rows and codes converted to bf16, as int4 ran before its rows were
  quantized to int8 for int8 tensor cores;
- ``tiled``: one program per block of rows (the schedule rebuilt from the offsets in each program), the up
  projection reading each token's hidden state where it lies (no gather; FP8 quantizes the tokens once, not
  their top-k copies), over a grid of tiles.

Every quantized row is checked against the per-expert kernel's output (max |difference| over max |value|).

    python benchmarks/prefill_kernels.py --out benchmarks/results/quantize/prefill_kernels_h100.json
"""

from __future__ import annotations

import argparse

import torch
from experts_kernels import time_call
from int4_kernels import EXPERTS, TOP_K, run_projections

from moe_fx.kernels.quantized import SCHEMES, quantize
from moe_fx.kernels.quantized_ops import activations_8bit
from moe_fx.kernels.triton_kernels import Tiles, grouped_tiles, quantize_rows, triton_grouped_mm

TILED = [Tiles(bm, bn, 128, w, st, sw, True) for bm in (64, 128) for bn in (128, 256) for w in (4, 8) for st in (3, 4)
         for sw in (False, True) if not (bm == 128 and bn == 256 and st == 4)]
"""The 28 tiled shapes tried for each scheme: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, SWAP, tiled)."""
BEFORE = {"fp8-block": Tiles(64, 128, 128, 4, 3, False), "int4-group": Tiles(128, 128, 128, 8, 3, True), "int8-channel": Tiles(64, 128, 128, 4, 3, False)}
"""The per-expert kernel's shapes for many rows before the tiled schedule (``grouped_tiles`` of 2026-12-05)."""


def projection_rows(proj: str, n: int, k: int, tokens: int, schemes: list[str], g: torch.Generator, grid: list[Tiles]) -> list[dict]:
    dense = torch.randn(EXPERTS, n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    ids = torch.randn(tokens, EXPERTS, device="cuda", generator=g).topk(TOP_K, dim=-1).indices.reshape(-1)
    sorted_ids, perm = torch.sort(ids)
    offsets = torch.searchsorted(sorted_ids, torch.arange(EXPERTS, device="cuda"), right=True).to(torch.int32)
    # up: tokens, each read by its top-k pairs; down: the activations, already one row per pair in expert order
    x = torch.randn(tokens if proj == "up" else tokens * TOP_K, k, device="cuda", dtype=torch.bfloat16, generator=g)
    src = perm // TOP_K if proj == "up" else None
    flops = 2 * tokens * TOP_K * n * k
    w_bf16 = dense.transpose(-2, -1)

    def sorted_rows() -> torch.Tensor:
        return x if src is None else x[src]

    out = [_timed(proj, tokens, "bf16", "cutlass", lambda: torch._grouped_mm(sorted_rows(), w_bf16, offs=offsets), flops)]
    for scheme in schemes:
        codes, scale = quantize(dense, scheme)
        spec = SCHEMES[scheme]
        w, quant = codes.transpose(-2, -1), (scale, spec.group_size(k), spec.kernel)
        eight_bit = activations_8bit(x.device, scheme)
        kind = {1: 3, 2: 4}[spec.kernel] if eight_bit else spec.kernel  # the kernel's QUANT with 8-bit activations
        default = grouped_tiles(ids.shape[0], EXPERTS, x.dtype, kind)
        before = BEFORE[scheme] if default.tiled else default  # few rows: the shape is unchanged, only the gather goes

        def per_expert(w=w, quant=quant, eight_bit=eight_bit, fp8=spec.fp8, tiles=before):
            rows = sorted_rows()
            if eight_bit:
                x_codes, x_scale = quantize_rows(rows, fp8)
                return triton_grouped_mm(x_codes, w, offsets, tiles, quant, x_scale, rows.dtype)
            return triton_grouped_mm(rows, w, offsets, tiles, quant)

        def tiled(tiles, w=w, quant=quant, eight_bit=eight_bit, fp8=spec.fp8):
            if eight_bit:
                x_codes, x_scale = quantize_rows(x, fp8)
                return triton_grouped_mm(x_codes, w, offsets, tiles, quant, x_scale, x.dtype, src)
            return triton_grouped_mm(x, w, offsets, tiles, quant, src=src)

        ref = per_expert().float()
        out.append(_timed(proj, tokens, scheme, f"before {tuple(before)[:6]}", per_expert, flops, ref))
        out.append(_timed(proj, tokens, scheme, f"default {tuple(default)}", lambda f=tiled, t=default: f(t), flops, ref))
        if eight_bit and spec.kernel == 2:  # int4 as it ran before its 8-bit activations: bf16 rows, codes converted
            plain = grouped_tiles(ids.shape[0], EXPERTS, x.dtype, spec.kernel)
            out.append(_timed(proj, tokens, scheme, f"weight-only {tuple(plain)}", lambda f=tiled, t=plain: f(t, eight_bit=False), flops, ref))
        for tiles in grid:
            out.append(_timed(proj, tokens, scheme, f"tiled {tuple(tiles)[:6]}", lambda t=tiles, f=tiled: f(t), flops, ref))
    return out


def _timed(proj: str, tokens: int, weights: str, kernel: str, fn, flops: int, ref: torch.Tensor | None = None) -> dict:
    row = {"proj": proj, "tokens": tokens, "weights": weights, "kernel": kernel}
    try:
        got = fn().float()
        us = time_call(fn, calls=5, replays=5)
    except Exception as exc:  # a tile shape that does not compile (registers, shared memory)
        return row | {"error": str(exc)[:160]}
    err = 0.0 if ref is None else ((got - ref).abs().max() / ref.abs().max()).item()
    return row | {"us": us, "TFLOPS": flops / us / 1e6, "rel_err": err}


def best(rows: list[dict]) -> list[list]:
    """Per (projection, tokens, weights): bf16, the per-expert kernel and the fastest tiled shape."""
    table = []
    for key in dict.fromkeys((r["proj"], r["tokens"], r["weights"]) for r in rows):
        ok = [r for r in rows if (r["proj"], r["tokens"], r["weights"]) == key and "us" in r]
        bf16 = next(r["us"] for r in rows if (r["proj"], r["tokens"], r["weights"]) == (*key[:2], "bf16"))
        picks = [r for r in ok if not r["kernel"].startswith("tiled")]
        tiled = [r for r in ok if r["kernel"].startswith("tiled")]
        picks += [min(tiled, key=lambda r: r["us"])] if tiled else []
        table += [[*key, r["kernel"], f"{r['us']:.1f}", f"{r['TFLOPS']:.0f}", f"{bf16 / r['us']:.2f}x", f"{r['rel_err']:.1e}"] for r in picks]
    return table


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096])
    ap.add_argument("--schemes", nargs="+", default=["fp8-block", "int4-group"])
    ap.add_argument("--grid", choices=["full", "none"], default="full")
    ap.add_argument("--out", default="benchmarks/results/quantize/prefill_kernels.json")
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    grid = TILED if args.grid == "full" else []
    run_projections(args.tokens, lambda proj, n, k, tokens: projection_rows(proj, n, k, tokens, args.schemes, g, grid), best,
                    ["proj", "tokens", "weights", "kernel", "us", "TFLOPS", "x bf16", "rel err"], args.out)


if __name__ == "__main__":
    main()
