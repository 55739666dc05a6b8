"""Expert pruning quality and cost on a trained MoE: random / frequency / REAP / NAEE at several drop ratios.

Calibrates once on the train split (the statistics are shared by every method), evaluates per-domain NLL
on the valid split before and after, measures parameters and on-disk size, and the calibration overhead
against a plain forward over exactly the same tokens. Prints a table and writes JSON.

    python benchmarks/expert_pruning.py --model ../shared/models/qwen3moe-bench \
        --calib ../shared/data/corpus/train.jsonl.gz --valid ../shared/data/corpus/valid.jsonl.gz
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from moe_fx import compose, state_of
from moe_fx.data import calibration_tokens
from moe_fx.evaluate import build_eval_set, disk_size, evaluate_nll, model_size
from moe_fx.exporters import save_checkpoint
from moe_fx.loading import load_model, load_tokenizer
from moe_fx.passes import Calibrate, DropExperts, Score
from moe_fx.table import format_table, human_bytes


def plain_forward_seconds(model, tokens, batch_size: int) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in tokens.batches(batch_size):
            model(input_ids=batch, use_cache=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--valid", required=True)
    ap.add_argument("--calib-tokens", type=int, default=200_000)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-seqs", type=int, default=8)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=2, help="timing repeats (min is reported)")
    ap.add_argument("--out", default="benchmarks/results/expert_pruning.json")
    args = ap.parse_args()

    torch.manual_seed(0)
    tok = load_tokenizer(args.model)
    base = load_model(args.model, dtype=args.dtype)
    tokens = calibration_tokens(args.calib, tok, seq_len=args.seq_len, max_tokens=args.calib_tokens, seed=0)
    eval_set = build_eval_set(args.valid, tok, seq_len=args.seq_len, seqs_per_domain=args.eval_seqs)

    plain, calib = [], []
    for _ in range(args.repeats):
        plain.append(plain_forward_seconds(base, tokens, args.batch_size))
        m = compose(Calibrate(tokens, batch_size=args.batch_size, show_progress=False))(copy.deepcopy(base))
        calib.append(state_of(m).stats.seconds)
    # one calibration shared by every method, with the token sample that search methods (NAEE) read
    m = compose(Calibrate(tokens, batch_size=args.batch_size, observers=("routing", "reap", "samples"), show_progress=False))(copy.deepcopy(base))
    stats = state_of(m).stats

    before = evaluate_nll(base, eval_set, show_progress=False)
    size_before = model_size(base)
    save_dtype = torch.bfloat16
    with tempfile.TemporaryDirectory() as tmp:
        disk_before = disk_size(args.model)
        runs = []
        for ratio in args.ratios:
            for method, seeds in (("naee", [0]), ("reap", [0]), ("frequency", [0]), ("random", list(range(args.random_seeds)))):
                per_seed = []
                for seed in seeds:
                    model = copy.deepcopy(base)
                    state_of(model).stats = stats
                    t0 = time.perf_counter()
                    model = compose(Score(method, seed=seed), DropExperts(ratio=ratio))(model)
                    score_seconds = time.perf_counter() - t0
                    per_seed.append(evaluate_nll(model, eval_set, show_progress=False))
                out = save_checkpoint(model.to(save_dtype), Path(tmp) / f"{method}-{ratio}", source=args.model, tokenizer=tok)
                domains = [d for d in before if d != "all"]
                delta = {d: sum(r[d]["nll"] for r in per_seed) / len(per_seed) - before[d]["nll"] for d in domains}
                runs.append(
                    {
                        "method": method,
                        "ratio": ratio,
                        "seeds": seeds,
                        "delta_nll": delta,
                        "delta_nll_per_seed": [{d: r[d]["nll"] - before[d]["nll"] for d in domains} for r in per_seed],
                        "experts_kept": state_of(model).spec.blocks[0].num_experts,
                        "params": model_size(model)["params"],
                        "disk_bytes": disk_size(out),
                        "score_seconds": score_seconds,
                    }
                )
    result = {
        "model": args.model,
        "calibration": {
            "tokens": tokens.num_tokens,
            "seconds_min": min(calib),
            "plain_forward_seconds_min": min(plain),
            "overhead": min(calib) / min(plain),
            "with_samples_seconds": stats.seconds,
        },
        "before": {"nll": before, "params": size_before["params"], "disk_bytes": disk_before},
        "runs": runs,
        "eval_tokens": eval_set.num_tokens,
        "dtype": args.dtype,
        "torch": torch.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    domains = [d for d in before if d not in ("mean", "all")]
    rows = [
        [f"{r['method']}" + (f" (mean of {len(r['seeds'])} seeds)" if len(r["seeds"]) > 1 else ""), f"{r['ratio']:.0%}", r["experts_kept"], f"{r['delta_nll']['mean']:+.3f}"]
        + [f"{r['delta_nll'][d]:+.3f}" for d in domains]
        + [f"{max(r['delta_nll'][d] for d in domains):+.3f}", f"{r['score_seconds']:.1f}s", f"{r['params'] / 1e6:.1f}M", human_bytes(r["disk_bytes"])]
        for r in runs
    ]
    headers = ["method", "dropped", "kept", "dNLL mean"] + [f"d {d}" for d in domains] + ["worst", "score time", "params", "disk"]
    print(format_table(headers, rows, title=f"{args.model}: before NLL mean {before['mean']['nll']:.3f}, {size_before['params'] / 1e6:.1f}M params, {human_bytes(disk_before)}"))
    c = result["calibration"]
    print(f"calibration: {c['tokens']:,} tokens, {c['seconds_min']:.1f} s vs plain forward {c['plain_forward_seconds_min']:.1f} s -> overhead {c['overhead']:.2f}x")
    print(f"calibration with the samples observer (NAEE): {c['with_samples_seconds']:.1f} s")


if __name__ == "__main__":
    main()
