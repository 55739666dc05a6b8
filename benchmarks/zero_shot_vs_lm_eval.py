"""Check moe-fx's zero-shot evaluator against lm-evaluation-harness on the same model and items.

The reference JSON comes from ``benchmarks/lm_eval_reference/run.py`` (lm-eval's own task yamls, pointed at
the local files; see that folder). Per task this compares the request strings lm-eval built with ours, the
per-request log-likelihoods and greedy flags, and the accuracies. Prints a table, writes JSON.

    python benchmarks/zero_shot_vs_lm_eval.py --reference benchmarks/lm_eval_reference/reference_bench_limit200.json \\
        --task-data ../shared/data/eval --out benchmarks/results/zero_shot_vs_lm_eval.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from moe_fx.evaluate.table import format_table
from moe_fx.evaluate.zero_shot import read_items, resolve_tasks, task_metrics
from moe_fx.evaluate.zero_shot.loglik import loglikelihoods, prefix_token_id, tokenizer_encoder
from moe_fx.formats.loading import load_model, load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", required=True)
    ap.add_argument("--model", help="default: the model the reference was run on")
    ap.add_argument("--task-data", default=os.environ.get("MOE_FX_EVAL_DATA", "../shared/data/eval"))
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--out")
    args = ap.parse_args()
    ref = json.loads(Path(args.reference).read_text())
    model_path = args.model or ref["model"]
    model = load_model(model_path, dtype=ref.get("dtype", "float32"))
    tok = load_tokenizer(model_path)
    encode, prefix = tokenizer_encoder(tok), prefix_token_id(tok)
    rows, report = [], {"reference": args.reference, "model": model_path, "lm_eval_version": ref["lm_eval_version"],
                        "limit": ref["limit"], "torch": torch.__version__, "tasks": {}}
    for ref_name, samples in ref["samples"].items():
        name = ref_name.removeprefix("local_")
        files = resolve_tasks(name, args.task_data)[name]
        items = read_items(name, files, ref["limit"])
        ours_requests = [r for it in items for r in it.requests]
        shown = [s for s in samples if "context_continuation" in s]  # the reference keeps the strings of its first doc
        theirs = [tuple(cc) for s in shown for cc in s["context_continuation"]]
        ours_shown = [(r.context, r.continuation) for s in shown for r in items[s["doc_id"]].requests]
        same_prompts = sum(a == b for a, b in zip(ours_shown, theirs))
        ours = loglikelihoods(model, encode, ours_requests, prefix_id=prefix, batch_tokens=args.batch_tokens, show_progress=False)
        their_ll = [tuple(ll) for s in sorted(samples, key=lambda s: s["doc_id"]) for ll in s["loglikelihoods"]]
        diffs = [abs(a[0] - b[0]) for a, b in zip(ours, their_ll)]
        greedy_same = sum(a[1] == b[1] for a, b in zip(ours, their_ll))
        metrics = task_metrics(name, items, ours)
        ref_metrics = ref["tasks"][ref_name]
        entry = {"items": len(items), "requests": len(ours_requests), "identical_prompts": f"{same_prompts}/{len(theirs)}",
                 "max_abs_loglik_diff": max(diffs), "mean_abs_loglik_diff": sum(diffs) / len(diffs), "greedy_agree": greedy_same,
                 "ours": {k: metrics[k] for k in ("acc", "acc_norm", "ppl") if k in metrics},
                 "lm_eval": {k: ref_metrics.get(k, ref_metrics.get("perplexity") if k == "ppl" else None) for k in ("acc", "acc_norm", "ppl") if k in metrics}}
        report["tasks"][name] = entry
        rows.append([name, len(items), entry["identical_prompts"], f"{entry['max_abs_loglik_diff']:.2e}",
                     f"{greedy_same}/{len(ours_requests)}",
                     f"{metrics['acc']:.3f} / {ref_metrics['acc']:.3f}",
                     f"{metrics['acc_norm']:.3f} / {ref_metrics['acc_norm']:.3f}" if "acc_norm" in metrics and "acc_norm" in ref_metrics else "-"])
    print(format_table(["task", "items", "same prompts (doc 0)", "max |Δ loglik|", "same greedy", "acc moe-fx / lm-eval", "acc_norm moe-fx / lm-eval"],
                       rows, title=f"moe-fx zero-shot vs lm-eval {ref['lm_eval_version']} on {model_path} ({ref['dtype']}, first {ref['limit']} items)"))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
