"""Choose CompensateExperts' ridge and sample size on held-out *train* tokens (never the valid split).

REAP-drops experts at each ratio, then compensates with every (ridge, inputs per block) pair; reports NLL on
calibration windows held out of the calibration (the selection criterion) and, for information only, the
valid split. Prints a table and writes JSON.

    python benchmarks/compensation_ridge.py --model ../shared/models/qwen3moe-bench \
        --calib ../shared/data/corpus/train.jsonl.gz --valid ../shared/data/corpus/valid.jsonl.gz
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from common import data_parser, mean_nll, quality_run

from moe_fx import compose, state_of
from moe_fx.evaluate.nll import evaluate_nll
from moe_fx.evaluate.table import format_table
from moe_fx.passes import Calibrate, CompensateExperts, DropExperts, Score


def main() -> None:
    ap = data_parser(__doc__.splitlines()[0])
    ap.add_argument("--ridges", type=float, nargs="+", default=[0.3, 1, 3, 10, 30])
    ap.add_argument("--inputs-per-block", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--out", default="benchmarks/results/compensation_ridge.json")
    args = ap.parse_args()

    setup = quality_run(args)
    base, calib, eval_set = setup.base, setup.tokens, setup.eval_set

    def holdout_nll(model) -> float:
        return mean_nll(model, setup.holdout, args.batch_size)

    base_holdout, base_valid = holdout_nll(base), setup.before["mean"]["nll"]
    rows, results = [], []
    for samples in args.inputs_per_block:
        observers = ("routing", "reap", "inputs")
        calibrated = compose(Calibrate(calib, observers=observers, inputs_per_block=samples, show_progress=False))(copy.deepcopy(base))
        stats = state_of(calibrated).stats
        for ratio in args.ratios:
            for ridge in [None, *args.ridges]:
                model = copy.deepcopy(base)
                state_of(model).stats = stats
                passes = [Score("reap"), DropExperts(ratio=ratio)] + ([CompensateExperts(ridge=ridge)] if ridge is not None else [])
                model = compose(*passes)(model)
                r = {
                    "inputs_per_block": samples, "ratio": ratio, "ridge": ridge,
                    "holdout_delta": holdout_nll(model) - base_holdout,
                    "valid_delta": evaluate_nll(model, eval_set, show_progress=False)["mean"]["nll"] - base_valid,
                }
                results.append(r)
                rows.append([samples, f"{ratio:.0%}", "none" if ridge is None else ridge, f"{r['holdout_delta']:+.4f}", f"{r['valid_delta']:+.4f}"])
                print(rows[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "device": args.device, "results": results, "options": vars(args)}, indent=2) + "\n")
    print(format_table(["inputs/block", "dropped", "ridge", "d NLL held-out train", "d NLL valid (info)"], rows, title="REAP + CompensateExperts"))


if __name__ == "__main__":
    main()
