"""int4 experts kernels at 1-64 tokens, beside bf16, FP8 and int8 weights, and over tile grids (GPU).

Until this file's second version, the int4 kernels loaded their codes one byte per instruction: the mask of
the codes' load was written in inputs (``k0 + 2 * halves < K``), which Triton's alignment analysis cannot
prove constant over a vector of bytes, so the load was split into 1-byte loads and the grouped kernel's
software pipeliner left it synchronous (0.65-0.77 TB/s of packed bytes, ``int4_kernels_h100_run1.json`` and
``int4_kernels_h200_run2.json``, whose ``pipelined`` rows also show that marking the loop
``tl.range(num_stages=S)`` changed nothing there). The mask is now written in bytes against the codes' own
length. This times, at Qwen3-30B-A3B shapes (128 experts, top-8, up and down projections), side by side:

- ``grouped``: ``triton_grouped_mm`` at its default tiles, as the forward runs it on Hopper (the rows quantized
  to 8 bits in the timed call: FP8 rows for FP8 codes, int8 rows for int8 and int4 codes); int4 also
  ``grouped weight-only`` (bf16 rows, codes converted to bf16) and over a tile grid, whose ``all / sum`` line is
  the shape with the least time summed over every projection and token count;
- ``gemv``: ``triton_routed_gemv`` (one program per routed pair) at its default tiles; int4 also over a grid.

Bandwidth counts the distinct experts' bytes (codes and scales). Errors: the max |difference| from the same
kernel at default tiles over its max |value|.

    python benchmarks/int4_kernels.py --out benchmarks/results/quantize/int4_kernels_h200.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
from experts_kernels import copy_bandwidth, routed_rows, time_call

from moe_fx.evaluate.table import format_table
from moe_fx.kernels.quantized import SCHEMES, quantize
from moe_fx.kernels.quantized_ops import activations_8bit
from moe_fx.kernels.triton_kernels import gemv_tiles, quantize_rows, triton_grouped_mm, triton_routed_gemv

HIDDEN, WIDTH, EXPERTS, TOP_K = 2048, 768, 128, 8


GROUPED_TILES = [(16, 64, 128, 4, 6, False), (16, 128, 128, 4, 4, False)] + [
    (16, bn, 128, w, st, False, False, subs) for subs in (2, 4) for bn in (32, 64, 128) for w in (4, 8) for st in (2, 3, 4, 6)
    if not (w == 8 and bn < 128) and not (subs == 4 and st == 6)]
"""int4 grouped tiles tried: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, SWAP[, tiled, SUBS]). Runs 5 and 6
(``int4_kernels_h100_run6.json``) swept 22 one-tile-a-step shapes: 64-input tiles (32 bytes of a column's codes
a step) read 1.5-1.8 TB/s where 128-input tiles read 1.9-2.1, swapped tiles lost at every decode shape, and
deeper pipelines (6 and 8 stages) gained nothing for the weight-only kernel (``int4_kernels_h100_run4.json``).
Their two best are kept beside steps of 2 and 4 tiles (``SUBS``: 128 and 256 bytes of a column a step)."""
GEMV_TILES = [(bn, 128, w) for bn in (16, 32, 64) for w in (2, 4, 8)]
"""int4 routed GEMV tiles tried: (BLOCK_N, BLOCK_K, warps)."""


def projection_rows(proj: str, n: int, k: int, tokens: int, schemes: list[str], g: torch.Generator) -> list[dict]:
    """One projection at ``tokens`` tokens: each scheme's grouped kernel and routed GEMV, int4's over tile grids."""
    dense = torch.randn(EXPERTS, n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    ids, offsets, distinct = routed_rows(tokens, EXPERTS, g)
    rows_per_x = TOP_K if proj == "up" else 1
    x = torch.randn(tokens * TOP_K // rows_per_x, k, device="cuda", dtype=torch.bfloat16, generator=g)
    rows = torch.randn(tokens * TOP_K, k, device="cuda", dtype=torch.bfloat16, generator=g)
    out = []
    for scheme in ["bf16", *schemes]:
        if scheme == "bf16":
            w, quant, nbytes = dense.transpose(-2, -1), None, dense[0].numel() * 2
        else:
            codes, scale = quantize(dense, scheme)
            w, quant = codes.transpose(-2, -1), (scale, SCHEMES[scheme].group_size(k), SCHEMES[scheme].kernel)
            nbytes = codes[0].numel() * codes.element_size() + scale[0].numel() * 4
        read = nbytes * distinct

        def grouped(tiles=None, w=w, quant=quant, scheme=scheme, weight_only=False):
            if quant is not None and not weight_only and activations_8bit(rows.device, scheme):
                # as the forward runs it: the rows quantized to 8 bits too, on 8-bit tensor cores
                x_codes, x_scale = quantize_rows(rows, SCHEMES[scheme].fp8)
                return triton_grouped_mm(x_codes, w, offsets, tiles, quant, x_scale, rows.dtype)
            return triton_grouped_mm(rows, w, offsets, tiles, quant)

        def gemv(tiles=None, w=w, quant=quant):
            return triton_routed_gemv(x, w, ids, rows_per_x, quant, tiles)

        cands = [("grouped", "default", grouped), ("gemv", str(gemv_tiles(w, quant)), gemv)]
        if scheme == "int4-group":
            cands += [("grouped weight-only", "default", lambda: grouped(weight_only=True))]
            cands += [("grouped grid", str(t), lambda t=t: grouped(t)) for t in GROUPED_TILES]
            cands += [("gemv grid", str(t), lambda t=t: gemv(t)) for t in GEMV_TILES]
        refs = {"grouped": grouped().float(), "gemv": gemv().float()}
        for kernel, variant, fn in cands:
            row = {"proj": proj, "tokens": tokens, "weights": scheme, "kernel": kernel, "variant": variant}
            try:
                ref = refs[kernel.split()[0]]  # the weight-only row: its error includes the activations' rounding
                err = ((fn().float() - ref).abs().max() / ref.abs().max()).item()
                us = time_call(fn, calls=10, replays=5)
            except Exception as exc:  # a tile shape that does not compile (registers, shared memory)
                out.append(row | {"error": str(exc)[:160]})
                continue
            out.append(row | {"us": us, "TB_s": read / us / 1e6, "rel_err": err})
    return out


def best(rows: list[dict]) -> list[list]:
    """Each (projection, tokens, weights, kernel): the default tiles, and the grids' best."""
    table = []
    for r in rows:
        if "us" in r and not r["kernel"].endswith("grid"):
            table.append(_line(r))
    for key in dict.fromkeys((r["proj"], r["tokens"], r["weights"], r["kernel"]) for r in rows if r["kernel"].endswith("grid")):
        ok = [r for r in rows if (r["proj"], r["tokens"], r["weights"], r["kernel"]) == key and "us" in r]
        if ok:
            table.append(_line(min(ok, key=lambda r: r["us"])))
    return table + overall_best(rows)


def overall_best(rows: list[dict]) -> list[list]:
    """Each grid's tile with the least time summed over every projection and token count (one default must serve
    them all); a tile that failed anywhere is out. Its ``variant`` is what ``decode.py``'s ``grouped-tiles=`` takes."""
    table = []
    for weights, kernel in dict.fromkeys((r["weights"], r["kernel"]) for r in rows if r["kernel"].endswith("grid")):
        mine = [r for r in rows if (r["weights"], r["kernel"]) == (weights, kernel)]
        cases = {(r["proj"], r["tokens"]) for r in mine}
        totals = {}
        for r in mine:
            totals.setdefault(r["variant"], []).append(r.get("us"))
        complete = {v: sum(us) for v, us in totals.items() if len(us) == len(cases) and None not in us}
        if complete:
            variant = min(complete, key=complete.get)
            table.append(["all", "sum", weights, kernel, variant, f"{complete[variant]:.1f}", "", ""])
    return table


def _line(r: dict) -> list:
    return [r["proj"], r["tokens"], r["weights"], r["kernel"], r["variant"], f"{r['us']:.1f}", f"{r['TB_s']:.2f}",
            f"{r['rel_err']:.1e}"]


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--schemes", nargs="+", default=["fp8-block", "int8-channel", "int4-group"])
    ap.add_argument("--out", default="benchmarks/results/quantize/int4_kernels_h200.json")
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    run_projections(args.tokens, lambda proj, n, k, tokens: projection_rows(proj, n, k, tokens, args.schemes, g), best,
                    ["proj", "tokens", "weights", "kernel", "variant", "us", "TB/s", "rel err"], args.out)


def run_projections(tokens: list[int], measure, summarize, columns: list[str], out: str) -> None:
    """``measure(proj, n, k, tokens)`` for the up and down projections at each token count; prints
    ``summarize(rows)`` as a table and writes every row, with the device and the copy bandwidth, to ``out``."""
    bandwidth = copy_bandwidth()
    rows = []
    for count in tokens:
        for proj, (n, k) in {"up": (2 * WIDTH, HIDDEN), "down": (HIDDEN, WIDTH)}.items():
            rows += measure(proj, n, k, count)
    table = summarize(rows)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s, triton {triton.__version__}")
    print(format_table(columns, table))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                                     "copy_TB_s": bandwidth / 1e12, "best": table, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
