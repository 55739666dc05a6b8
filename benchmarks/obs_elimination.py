"""The ``obs`` channel scorer's elimination (:func:`moe_fx.score.obs.obs_elimination`) at Qwen3-30B-A3B's shapes:
its steps launched one by one against one block captured as a CUDA graph and replayed (``graphs=True``), side by
side in one process, with the costs compared bit for bit.

At these shapes a layer is 128 experts of width 768: 768 steps of about 20 small kernels each, which the host
launches one by one (the scorer took 0.8-1.2 s a layer on an H100 in streamed channel recipes, ``docs/benchmarks/scale.md``).

    python benchmarks/obs_elimination.py --out benchmarks/results/obs_elimination_h100.json
    python benchmarks/obs_elimination.py --device cpu --experts 4 --width 128 --hidden 64 --out /tmp/obs.json   # smoke test
"""

from __future__ import annotations

import torch
from common import expert_matrices_parser, report_timings, timed_candidates

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
    ap = expert_matrices_parser(__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024, help="activation rows per expert")
    args = ap.parse_args()
    gram, gram_w = grams(args)
    rows, costs = timed_candidates({graphs: lambda graphs=graphs: obs_elimination(gram, gram_w, 0.01, graphs=graphs) for graphs in (False, True)},
                                   args, "graphs")
    same = bool(torch.equal(costs[False], costs[True]))
    report_timings(args, rows, "graphs", "CUDA graph",
                   f"obs elimination, {args.experts} experts of width {args.width}, {args.device}; costs identical: {same}", costs_identical=same)

if __name__ == "__main__":
    main()
