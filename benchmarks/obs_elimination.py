"""The ``obs`` channel scorer's elimination (:func:`moe_fx.score.obs.obs_elimination`) at Qwen3-30B-A3B's shapes:
its steps launched one by one against one block captured as a CUDA graph and replayed (``graphs=True``), side by
side in one process, with the costs compared bit for bit.

At these shapes a layer is 128 experts of width 768: 768 steps of about 20 small kernels each, which the host
launches one by one (the scorer took 0.8-1.2 s a layer on an H100 in streamed channel recipes, ``docs/benchmarks/scale.md``).

    python benchmarks/obs_elimination.py --out benchmarks/results/obs_elimination_h100.json
    python benchmarks/obs_elimination.py --device cpu --experts 4 --width 128 --hidden 64 --out /tmp/obs.json   # smoke test
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import median_run

from moe_fx.evaluate.table import format_table
from moe_fx.score.obs import obs_elimination


def grams(args) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``A^T A`` and ``D^T D`` (float64) of ``experts`` experts: ``tokens`` activation rows each, with channel
    scales spread over two orders of magnitude, and a down projection of ``hidden`` columns."""
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    a = torch.randn(args.experts, args.tokens, args.width, generator=g, device=args.device, dtype=torch.float64)
    a *= torch.logspace(-1, 1, args.width, device=args.device, dtype=torch.float64)[torch.randperm(args.width, generator=g, device=args.device)]
    dt = torch.randn(args.experts, args.width, args.hidden, generator=g, device=args.device, dtype=torch.float64) * 0.02
    return a.transpose(1, 2) @ a, dt @ dt.transpose(1, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=1024, help="activation rows per expert")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    gram, gram_w = grams(args)
    rows, costs = [], {}
    for graphs in (False, True):
        median, seconds, costs[graphs] = median_run(lambda graphs=graphs: obs_elimination(gram, gram_w, 0.01, graphs=graphs), args.repeats, args.device)
        rows.append({"graphs": graphs, "seconds": median, "all_seconds": seconds})
    same = bool(torch.equal(costs[False], costs[True]))
    table = [[str(r["graphs"]), f"{r['seconds']:.3f}", f"{rows[0]['seconds'] / r['seconds']:.2f}x"] for r in rows]
    print(format_table(["CUDA graph", "s (median)", "speed-up"], table,
                       title=f"obs elimination, {args.experts} experts of width {args.width}, {args.device}; costs identical: {same}"))
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__, **vars(args)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "costs_identical": same}, indent=1) + "\n")


if __name__ == "__main__":
    main()
