"""Choose CompensateExperts' ridge and sample size on held-out *train* tokens (never the valid split).

REAP-drops experts at each ratio (or, with ``--channel-scorer``, drops each ``--expert-shares`` of the experts and
removes channels by that scorer for the rest of the ratio, at each of its ``--damps``), then compensates with every
(ridge, inputs per block) pair; reports NLL on calibration windows held out of the calibration (the selection
criterion) and, for information only, the valid split, also as a ratio to plain REAP's loss at the same ratio on
the same calibration (the issue's goals are such ratios). Prints a table and writes JSON.

    python benchmarks/compensation_ridge.py --model ../shared/models/qwen3moe-bench \
        --calib ../shared/data/corpus/train.jsonl.gz --valid ../shared/data/corpus/valid.jsonl.gz
    python benchmarks/compensation_ridge.py ... --channel-scorer obs --damps 0.01 0.1 --expert-shares 0 0.125 \
        --ridges 0.1 0.3 1 --inputs-per-block 16384 --device cpu --out benchmarks/results/compensation_ridge_obs_cpu.json
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

from common import data_parser, experts_then_channels, mean_nll, quality_run

from moe_fx import compose, state_of
from moe_fx.evaluate.nll import evaluate_nll
from moe_fx.evaluate.table import format_table
from moe_fx.passes import Calibrate, CompensateExperts, DropExperts, Score
from moe_fx.score.base import SCORERS


def pruning(ratio: float, scorer: str | None, share: float, damp: float | None) -> list:
    """The passes before compensation: REAP drops ``ratio`` of the experts, or ``share`` of them and then ``scorer``'s
    channels (with ``damp`` where it takes one) for the rest of ``ratio`` of the routed parameters."""
    if scorer is None:
        return [Score("reap"), DropExperts(ratio=ratio)]
    return experts_then_channels(ratio, share, scorer, options=None if damp is None else {"damp": damp})


def main() -> None:
    ap = data_parser(__doc__.splitlines()[0])
    ap.add_argument("--ridges", type=float, nargs="+", default=[0.3, 1, 3, 10, 30])
    ap.add_argument("--inputs-per-block", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--channel-scorer", help="remove channels by this scorer (after --expert-shares of the experts) instead of experts")
    ap.add_argument("--expert-shares", type=float, nargs="+", default=[0.0], help="--channel-scorer: experts dropped first")
    ap.add_argument("--damps", type=float, nargs="+", default=None, help="--channel-scorer: its damp option (obs)")
    ap.add_argument("--out", default="benchmarks/results/compensation_ridge.json")
    args = ap.parse_args()

    setup = quality_run(args)
    base, calib, eval_set = setup.base, setup.tokens, setup.eval_set

    def holdout_nll(model) -> float:
        return mean_nll(model, setup.holdout, args.batch_size)

    base_holdout, base_valid = holdout_nll(base), setup.before["mean"]["nll"]
    rows, results = [], []
    reference = {}  # plain REAP at each ratio, on the same calibration: what the goals are ratios of
    for samples in args.inputs_per_block:
        scorer_observers = SCORERS[args.channel_scorer].observers if args.channel_scorer else ()
        observers = tuple(dict.fromkeys(("routing", "reap", "inputs", *scorer_observers)))
        calibrated = compose(Calibrate(calib, observers=observers, inputs_per_block=samples, show_progress=False))(copy.deepcopy(base))
        stats = state_of(calibrated).stats
        for ratio in args.ratios:
            if ratio not in reference:
                model = copy.deepcopy(base)
                state_of(model).stats = stats
                model = compose(Score("reap"), DropExperts(ratio=ratio))(model)
                reference[ratio] = evaluate_nll(model, eval_set, show_progress=False)["mean"]["nll"] - base_valid
        shares = args.expert_shares if args.channel_scorer else [0.0]
        for ratio, share, damp in itertools.product(args.ratios, shares, args.damps or [None]):
            for ridge in [None, *args.ridges]:
                model = copy.deepcopy(base)
                state_of(model).stats = stats
                passes = pruning(ratio, args.channel_scorer, share, damp) + ([CompensateExperts(ridge=ridge)] if ridge is not None else [])
                model = compose(*passes)(model)
                r = {
                    "inputs_per_block": samples, "ratio": ratio, "channel_scorer": args.channel_scorer, "expert_share": share, "damp": damp,
                    "ridge": ridge, "holdout_delta": holdout_nll(model) - base_holdout,
                    "valid_delta": evaluate_nll(model, eval_set, show_progress=False)["mean"]["nll"] - base_valid,
                }
                r["valid_vs_reap"] = r["valid_delta"] / reference[ratio]
                results.append(r)
                rows.append([samples, f"{ratio:.0%}", f"{share:.1%}", damp, "none" if ridge is None else ridge, f"{r['holdout_delta']:+.4f}",
                             f"{r['valid_delta']:+.4f}", f"{r['valid_vs_reap']:.2f}x"])
                print(rows[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "device": args.device, "results": results,
                                               "plain_reap_valid_delta": {str(k): v for k, v in reference.items()}, "options": vars(args)}, indent=2) + "\n")
    title = f"REAP experts, then {args.channel_scorer} channels, + CompensateExperts" if args.channel_scorer else "REAP + CompensateExperts"
    print(format_table(["inputs/block", "removed", "experts first", "damp", "ridge", "d NLL held-out train", "d NLL valid (info)", "valid / plain REAP's"], rows, title=title))


if __name__ == "__main__":
    main()
