"""Expert substitution (MoNE, arXiv 2507.00390) against dropping, on a trained MoE, through the passes.

MoNE keeps the router whole and replaces each pruned expert by a constant "novice" vector: a token routed to it
gets ``w * c`` instead of ``w * expert(x)``, while dropping re-routes the token to its next-best kept expert.
This script measures both on the same calibration (train split) and valid text: ``DropExperts`` with REAP's choice,
and ``SubstituteExperts`` with REAP's choice (the very experts the drop rows drop) or MoNE's own (``Score("mone")``,
``--method mone``: the least substitution error), each without and with the refit (``CompensateExperts`` after the
drop; ``SubstituteExperts(refit=True)``, ``--method mone --compensate``: the kept experts' down projections and the
constants refit to the block's original output, routing kept).

    python benchmarks/expert_substitution.py --model ../shared/models/qwen3moe-bench \
        --calib ../shared/data/corpus/train.jsonl.gz --valid ../shared/data/corpus/valid.jsonl.gz --device cpu
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from common import calibrate, data_parser, quality_run

from moe_fx import compose, state_of
from moe_fx.evaluate.nll import evaluate_nll
from moe_fx.evaluate.table import format_table
from moe_fx.passes import CompensateExperts, DropExperts, Score, SubstituteExperts

OBSERVERS = ("routing", "reap", "inputs")


def main() -> None:
    ap = data_parser(__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/expert_substitution.json")
    args = ap.parse_args()
    setup = quality_run(args)
    base, before = setup.base, setup.before
    stats = calibrate(base, setup.tokens, args.batch_size, OBSERVERS)

    def measured(model) -> dict:
        after = evaluate_nll(model, setup.eval_set, batch_size=args.batch_size, show_progress=False)
        return {"delta_nll": after["mean"]["nll"] - before["mean"]["nll"]}

    rows = []
    for ratio in args.ratios:
        for refit in (False, True):
            variants = [("drop (re-route)", "reap", [Score("reap"), DropExperts(ratio=ratio), *([CompensateExperts()] if refit else [])])]
            variants += [("substitute (MoNE)", chosen_by, [Score(scorer), SubstituteExperts(ratio=ratio, refit=refit)])
                         for chosen_by, scorer in (("reap", "reap"), ("substitution error", "mone"))]
            for rewrite, chosen_by, passes in variants:
                t0 = time.perf_counter()
                model = copy.deepcopy(base)
                state_of(model).stats = stats
                model = compose(*passes)(model)
                rows.append({"ratio": ratio, "rewrite": rewrite, "chosen_by": chosen_by, "refit": refit,
                             **measured(model), "seconds": time.perf_counter() - t0})
                print(f"{ratio:.0%} {rewrite} by {chosen_by} refit={refit}: {rows[-1]['delta_nll']:+.4f}", flush=True)
    reap = {r["ratio"]: r["delta_nll"] for r in rows if r["rewrite"].startswith("drop") and not r["refit"]}
    print(format_table(["experts pruned", "rewrite", "experts chosen by", "kept experts refit", "mean dNLL", "x REAP"],
                       [[f"{r['ratio']:.0%}", r["rewrite"], r["chosen_by"], "yes" if r["refit"] else "no", f"{r['delta_nll']:+.4f}",
                         f"{r['delta_nll'] / reap[r['ratio']]:.2f}x"] for r in rows],
                       title=f"expert substitution vs dropping, {args.model}"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "device": args.device, "calibration_tokens": setup.tokens.num_tokens,
                                          "before": before, "rows": rows, "options": vars(args)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
