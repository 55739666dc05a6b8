"""Compensation's ridge refits at Qwen3-30B-A3B's shapes: one LU solve per expert and sweep (the pass before
2026-12-07, written out here as the reference), against :func:`moe_fx.rewrite.compensate.ridge_systems`, one
batched Cholesky factorization of every expert's system reused by every sweep (the systems do not change between
sweeps: only their right-hand sides do), side by side in one process, with the largest relative difference of the
refit weights.

Compensation took 0.7-1.5 s a layer on an H100 (``docs/benchmarks/scale.md``), for 128 experts and 2 sweeps: 256
solves of a 768 x 768 float64 system with 2,048 right-hand sides. This says how much of that the solves were.

    python benchmarks/refit_solves.py --out benchmarks/results/refit_solves_h100.json
    python benchmarks/refit_solves.py --device cpu --experts 4 --width 96 --hidden 64 --out /tmp/refit.json   # smoke test
"""

from __future__ import annotations

import torch
from common import expert_matrices_parser, report_timings, timed_candidates

from moe_fx.rewrite.compensate import ridge_systems


def systems(args) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per expert: routing-weighted activations ``A [rows, I]``, targets ``Z [rows, H]`` and the old ``D^T [I, H]``."""
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    out = []
    for _ in range(args.experts):
        a = torch.randn(args.rows, args.width, generator=g, device=args.device, dtype=torch.float64)
        z = torch.randn(args.rows, args.hidden, generator=g, device=args.device, dtype=torch.float64)
        d0 = torch.randn(args.width, args.hidden, generator=g, device=args.device, dtype=torch.float64) * 0.02
        out.append((a, z, d0))
    return out


def per_expert_lu(cases, ridge: float, sweeps: int) -> list[torch.Tensor]:
    """The refit before ``ridge_systems``: the Gram matrix, its shift and an LU solve, per expert and sweep."""
    out = []
    for _ in range(sweeps):
        out = []
        for a, z, d0 in cases:
            gram = a.T @ a
            trace = torch.trace(gram)
            lam = ridge * trace / gram.shape[0]
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            out.append(torch.linalg.solve_ex(gram + (lam + 1e-10 * trace.clamp(min=1e-30) / gram.shape[0]) * eye, a.T @ z + lam * d0).result)
    return out


def factorized_once(cases, ridge: float, sweeps: int) -> list[torch.Tensor]:
    """As the pass runs now: every system factorized together once, then solved per expert and sweep."""
    systems = ridge_systems([(a.new_ones(len(a), 1), a) for a, _, _ in cases], ridge)
    out = []
    for _ in range(sweeps):
        out = [system.solve(a, z, d0) for system, (a, z, d0) in zip(systems, cases)]
    return out


def main() -> None:
    ap = expert_matrices_parser(__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024, help="sampled rows routed to each expert")
    ap.add_argument("--sweeps", type=int, default=2)
    ap.add_argument("--ridge", type=float, default=1.0)
    args = ap.parse_args()
    cases = systems(args)
    solvers = {"LU per expert and sweep (before)": per_expert_lu, "ridge_systems: batched Cholesky, reused": factorized_once}
    rows, weights = timed_candidates({name: lambda fn=fn: fn(cases, args.ridge, args.sweeps) for name, fn in solvers.items()}, args, "solver")
    ref, new = weights.values()
    rel = max(float((x - y).norm() / y.norm()) for x, y in zip(new, ref))
    report_timings(args, rows, "solver", "solver",
                   f"{args.experts} refits x {args.sweeps} sweeps, width {args.width}, {args.hidden} outputs, {args.device}; "
                   f"largest relative difference {rel:.1e}", max_relative_difference=rel)

if __name__ == "__main__":
    main()
