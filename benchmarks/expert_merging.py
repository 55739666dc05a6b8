"""Merging against dropping on a trained MoE: REAM (arXiv 2604.04356) and moe-fx's nearest-expert merge, with
their parts taken apart, without and with compensation, at several ratios.

Every row keeps the same experts (REAP's choice, uniform allocation); only what happens to the dropped ones
differs: discarded (REAP), folded into their nearest kept expert (``--merge``) or grouped and averaged the REAM
way (``--method ream``), plus REAM with one part swapped for the nearest merge's (its weighting, alignment or
group size), to see which part does the work. One calibration (train split) serves every row; NLL on the
valid split. Prints a table and writes JSON.

    python benchmarks/expert_merging.py --model ../shared/models/qwen3moe-bench \\
        --calib ../shared/data/corpus/train.jsonl.gz --valid ../shared/data/corpus/valid.jsonl.gz --device cpu
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from common import data_parser, quality_run

from moe_fx import compose, state_of
from moe_fx.evaluate.nll import evaluate_nll
from moe_fx.evaluate.table import format_table
from moe_fx.passes import Calibrate, CompensateExperts, DropExperts, MergeExperts, Score

OBSERVERS = ("routing", "reap", "samples", "inputs")

VARIANTS: dict[str, dict | None] = {
    "drop (REAP)": None,
    "merge nearest": {"grouping": "nearest"},
    "REAM": {"grouping": "ream"},
    "REAM, count weights": {"grouping": "ream", "weighting": "count"},
    "REAM, weight alignment": {"grouping": "ream", "align": "weights"},
    "REAM, group size 2": {"grouping": "ream", "group_size": 2},
    "REAM, one group (size E)": {"grouping": "ream", "group_size": 10**6},
}


def main() -> None:
    ap = data_parser(__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--compensate", nargs="+", default=["no", "yes"], choices=["no", "yes"])
    ap.add_argument("--samples", type=int, default=1024, help="tokens per block the samples observer keeps (REAM's similarity, alignment)")
    ap.add_argument("--out", default="benchmarks/results/expert_merging.json")
    args = ap.parse_args()

    run = quality_run(args)
    t0 = time.perf_counter()
    model = copy.deepcopy(run.base)
    stats = state_of(compose(Calibrate(run.tokens, batch_size=args.batch_size, observers=OBSERVERS, samples_per_block=args.samples,
                                       show_progress=False))(model)).stats
    calib_seconds = time.perf_counter() - t0
    del model
    domains = [d for d in run.before if d not in ("mean", "all")]
    rows = []
    for ratio in args.ratios:
        for name in args.variants:
            for comp in [c == "yes" for c in args.compensate]:
                model = copy.deepcopy(run.base)
                state_of(model).stats = stats
                options = VARIANTS[name]
                rewrite = DropExperts(ratio=ratio) if options is None else MergeExperts(ratio=ratio, **options)
                t = time.perf_counter()
                model = compose(Score("reap"), rewrite, *([CompensateExperts()] if comp else []))(model)
                seconds = time.perf_counter() - t
                after = evaluate_nll(model, run.eval_set, batch_size=args.batch_size, show_progress=False)
                delta = {d: after[d]["nll"] - run.before[d]["nll"] for d in domains + ["mean"]}
                report = state_of(model).report_of("merge_experts") or {}
                rows.append({"ratio": ratio, "variant": name, "compensate": comp, "delta_nll": delta,
                             "worst_delta": max(delta[d] for d in domains), "seconds": seconds,
                             "mean_alignment": report.get("mean_alignment")})
                print(f"{ratio:.0%} {name:>26} comp={comp!s:5} dNLL {delta['mean']:+.4f} ({seconds:.1f} s)", flush=True)
    reap = {r["ratio"]: r["delta_nll"]["mean"] for r in rows if r["variant"] == "drop (REAP)" and not r["compensate"]}
    table = [[f"{r['ratio']:.0%}", r["variant"], "yes" if r["compensate"] else "no", f"{r['delta_nll']['mean']:+.4f}",
              f"{r['delta_nll']['mean'] / reap[r['ratio']]:.2f}x" if r["ratio"] in reap else "-", f"{r['worst_delta']:+.4f}",
              "-" if r["mean_alignment"] is None else f"{r['mean_alignment']:.3f}", f"{r['seconds']:.1f}s"] for r in rows]
    print(format_table(["dropped", "rewrite", "compensate", "dNLL mean", "vs REAP", "worst domain", "neuron match", "rewrite time"], table,
                       title=f"{args.model}: NLL before {run.before['mean']['nll']:.3f}; calibration {run.tokens.num_tokens:,} tokens"))
    result = {"model": args.model, "calib_tokens": run.tokens.num_tokens, "calib_seconds": calib_seconds, "eval_tokens": run.eval_set.num_tokens,
              "before": run.before, "runs": rows, "options": vars(args), "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
