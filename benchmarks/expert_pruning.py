"""Expert pruning quality and cost on a trained MoE: every method, with and without merging, uniform and
global allocation, at several drop ratios; plus the task-driven check (single-domain calibration).

Calibrates once on the train split (statistics shared by every method; the EEP fitness windows are held out
of it), evaluates per-domain NLL on the valid split before and after, measures parameters and on-disk size,
and the calibration overhead against a plain forward over exactly the same tokens. Nothing is tuned on the
valid split. Prints tables and writes JSON.

    python benchmarks/expert_pruning.py --model ../shared/models/qwen3moe-bench \
        --calib ../shared/data/corpus/train.jsonl.gz --valid ../shared/data/corpus/valid.jsonl.gz
"""

from __future__ import annotations

import copy
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch
from common import calibrate, data_parser, held_out_windows, quality_run

from moe_fx import compose, state_of
from moe_fx.calibrate.data import TokenBatch
from moe_fx.evaluate.nll import disk_size, evaluate_nll, model_size
from moe_fx.evaluate.table import format_table, human_bytes
from moe_fx.formats import save_checkpoint
from moe_fx.passes import CompensateExperts, DropExperts, MergeExperts, Score
from moe_fx.plan.eep import EvolutionarySearch

OBSERVERS = ("routing", "reap", "samples", "inputs")


def plain_forward_seconds(model, tokens: TokenBatch, batch_size: int) -> float:
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in tokens.batches(batch_size):
            model(input_ids=batch.to(device), use_cache=False)
    return time.perf_counter() - t0



class Runner:
    """Prunes copies of one base model with shared calibration statistics and evaluates them."""

    def __init__(self, args, base, tok, eval_set, before, save_dir: Path) -> None:
        self.args, self.base, self.tok, self.eval_set, self.before, self.save_dir = args, base, tok, eval_set, before, save_dir
        self.plans: dict[tuple, object] = {}

    def search(self, fitness: torch.Tensor, allocation: str, refine) -> EvolutionarySearch:
        a = self.args
        return EvolutionarySearch(
            fitness, population=a.eep_population, generations=a.eep_generations, allocation=allocation,
            batch_size=a.batch_size, seed=0, show_progress=False, refine=refine, max_seconds=a.eep_max_seconds,
        )

    def run(self, stats, fitness, method: str, ratio: float, allocation: str, merge: bool, compensate: bool = False, seed: int = 0, tag: str = "mixed") -> dict:
        model = copy.deepcopy(self.base)
        state_of(model).stats = stats
        rewrite = MergeExperts if merge else DropExperts
        refine = CompensateExperts() if compensate and self.args.eep_refine else None
        key = (tag, method, ratio, allocation, refine is not None)
        t0 = time.perf_counter()
        if method == "eep":
            if key in self.plans:  # the merge variant applies the plan the plain search found
                passes = [rewrite(plan=self.plans[key])]
            else:
                passes = [Score("reap"), rewrite(ratio=ratio, allocation=self.search(fitness, allocation, refine))]
        else:
            passes = [Score(method, seed=seed), rewrite(ratio=ratio, allocation=allocation)]
        if compensate:
            passes.append(CompensateExperts())
        model = compose(*passes)(model)
        seconds = time.perf_counter() - t0
        state = state_of(model)
        if method == "eep" and key not in self.plans:
            self.plans[key] = state.plan
        after = evaluate_nll(model, self.eval_set, batch_size=self.args.batch_size, show_progress=False)
        domains = [d for d in self.before if d not in ("mean", "all")]
        delta = {d: after[d]["nll"] - self.before[d]["nll"] for d in domains + ["mean"]}
        out = save_checkpoint(model.to(torch.bfloat16), self.save_dir / f"{tag}-{method}-{ratio}-{allocation}-{merge}-{compensate}-{seed}", source=self.args.model, tokenizer=self.tok)
        return {
            "calibration": tag,
            "method": method,
            "ratio": ratio,
            "allocation": allocation,
            "merge": merge,
            "compensate": compensate,
            "seed": seed,
            "delta_nll": delta,
            "worst_domain": max(domains, key=lambda d: delta[d]),
            "worst_delta": max(delta[d] for d in domains),
            "experts_per_block": [b.num_experts for b in state.spec.blocks],
            "params": model_size(model)["params"],
            "disk_bytes": disk_size(out),
            "seconds": seconds,
            "search": state.search.to_dict() if state.search is not None else None,
        }


def mean_of_seeds(runs: list[dict]) -> dict:
    """Random-scorer runs averaged over seeds (one row in the table)."""
    out = dict(runs[0])
    out["delta_nll"] = {d: sum(r["delta_nll"][d] for r in runs) / len(runs) for d in runs[0]["delta_nll"]}
    out["worst_delta"] = sum(r["worst_delta"] for r in runs) / len(runs)
    out["seed"] = [r["seed"] for r in runs]
    out["per_seed"] = [r["delta_nll"] for r in runs]
    return out


def main() -> None:
    ap = data_parser(__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["random", "frequency", "reap", "naee", "shape", "eep"])
    ap.add_argument("--allocations", nargs="+", default=["uniform", "global"])
    ap.add_argument("--merge", nargs="+", default=["no", "yes"], help="run without (no) and/or with (yes) merging")
    ap.add_argument("--compensate", nargs="+", default=["no", "yes"], help="run without (no) and/or with (yes) CompensateExperts")
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--eep-population", type=int, default=16)
    ap.add_argument("--eep-generations", type=int, default=20)
    ap.add_argument("--eep-max-seconds", type=float, default=None)
    ap.add_argument("--eep-refine", action="store_true", help="with compensation: EEP measures each candidate after compensating it")
    ap.add_argument("--task-domain", default="news_reuters", help="domain of the single-domain calibration check ('' to skip)")
    ap.add_argument("--task-methods", nargs="+", default=["reap", "shape", "eep"])
    ap.add_argument("--repeats", type=int, default=2, help="timing repeats (min is reported)")
    ap.add_argument("--out", default="benchmarks/results/expert_pruning.json")
    args = ap.parse_args()

    setup = quality_run(args)
    tok, base, docs, tokens, fitness, eval_set, before = setup.tokenizer, setup.base, setup.docs, setup.tokens, setup.holdout, setup.eval_set, setup.before

    plain, calib_s = [], []
    for _ in range(args.repeats):
        plain.append(plain_forward_seconds(base, tokens, args.batch_size))
        calib_s.append(calibrate(base, tokens, args.batch_size, ("routing", "reap")).seconds)
    stats = calibrate(base, tokens, args.batch_size, OBSERVERS)
    size_before = model_size(base)

    runs, task_runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner(args, base, tok, eval_set, before, Path(tmp))
        for ratio in args.ratios:
            for method in args.methods:
                for allocation in args.allocations:
                    for merge, comp in itertools.product([m == "yes" for m in args.merge], [c == "yes" for c in args.compensate]):
                        seeds = range(args.random_seeds) if method == "random" else [0]
                        per_seed = [runner.run(stats, fitness, method, ratio, allocation, merge, comp, seed) for seed in seeds]
                        runs.append(mean_of_seeds(per_seed) if len(per_seed) > 1 else per_seed[0])
                        print(_row(runs[-1]), flush=True)
        task = None
        if args.task_domain:
            domain_docs = [d for d in docs if d.domain == args.task_domain]
            d_tokens, d_fitness = held_out_windows(tok, domain_docs, args)
            d_stats = calibrate(base, d_tokens, args.batch_size, OBSERVERS)
            for ratio in args.ratios:
                for method, comp in itertools.product(args.task_methods, [c == "yes" for c in args.compensate]):
                    task_runs.append(runner.run(d_stats, d_fitness, method, ratio, "uniform", False, comp, tag=args.task_domain))
                    print(_row(task_runs[-1]), flush=True)
            task = {"domain": args.task_domain, "tokens": d_tokens.num_tokens, "runs": task_runs}

    result = {
        "model": args.model,
        "device": args.device,
        "calibration": {
            "tokens": tokens.num_tokens,
            "fitness_tokens": int(fitness.numel()),
            "seconds_min": min(calib_s),
            "plain_forward_seconds_min": min(plain),
            "overhead": min(calib_s) / min(plain),
            "with_samples_seconds": stats.seconds,
        },
        "before": {"nll": before, "params": size_before["params"], "disk_bytes": disk_size(args.model)},
        "runs": runs,
        "task_driven": task,
        "eval_tokens": eval_set.num_tokens,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "options": vars(args),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print_tables(result)


def _row(r: dict) -> str:
    return (f"{r['calibration']:>12} {r['method']:>9} {r['ratio']:.0%} {r['allocation']:>7} merge={r['merge']!s:5} comp={r['compensate']!s:5} "
            f"dNLL {r['delta_nll']['mean']:+.3f} worst {r['worst_delta']:+.3f} {r['seconds']:.1f}s")


def print_tables(result: dict) -> None:
    before = result["before"]
    domains = [d for d in before["nll"] if d not in ("mean", "all")]
    reap = {r["ratio"]: r["delta_nll"]["mean"] for r in result["runs"] if r["method"] == "reap" and r["allocation"] == "uniform" and not r["merge"] and not r["compensate"]}
    rows = [
        [r["method"] + (f" ({len(r['seed'])} seeds)" if isinstance(r["seed"], list) else ""), f"{r['ratio']:.0%}", r["allocation"], "yes" if r["merge"] else "no", "yes" if r["compensate"] else "no",
         f"{min(r['experts_per_block'])}-{max(r['experts_per_block'])}", f"{r['delta_nll']['mean']:+.3f}", f"{r['delta_nll']['mean'] / reap[r['ratio']]:.2f}x" if r["ratio"] in reap else "-",
         f"{r['worst_delta']:+.3f} ({r['worst_domain']})", f"{r['seconds']:.1f}s", f"{r['params'] / 1e6:.1f}M", human_bytes(r["disk_bytes"])]
        for r in result["runs"]
    ]
    headers = ["method", "dropped", "allocation", "merge", "compensate", "kept/block", "dNLL mean", "vs REAP", "worst domain", "score+rewrite", "params", "disk"]
    print(format_table(headers, rows, title=f"{result['model']}: before NLL mean {before['nll']['mean']['nll']:.3f}, {before['params'] / 1e6:.1f}M params, {human_bytes(before['disk_bytes'])}"))
    c = result["calibration"]
    print(f"calibration: {c['tokens']:,} tokens, {c['seconds_min']:.1f} s vs plain forward {c['plain_forward_seconds_min']:.1f} s -> "
          f"overhead {c['overhead']:.2f}x; with the samples observer {c['with_samples_seconds']:.1f} s")
    task = result["task_driven"]
    if task:
        mixed = {(r["method"], r["ratio"], r["compensate"]): r for r in result["runs"] if r["allocation"] == "uniform" and not r["merge"]}
        rows = []
        for r in task["runs"]:
            m = mixed.get((r["method"], r["ratio"], r["compensate"]))
            if m is None:  # the method was not run on the mixed calibration
                continue
            others = lambda run: sum(v for d, v in run["delta_nll"].items() if d not in (task["domain"], "mean")) / (len(domains) - 1)
            rows.append([r["method"] + (" +comp" if r["compensate"] else ""), f"{r['ratio']:.0%}", f"{m['delta_nll'][task['domain']]:+.3f}",
                         f"{r['delta_nll'][task['domain']]:+.3f}", f"{others(m):+.3f}", f"{others(r):+.3f}"])
        headers = ["method", "dropped", f"d {task['domain']} (mixed calib)", f"d {task['domain']} ({task['domain']} calib)", "d others (mixed)", f"d others ({task['domain']})"]
        print(format_table(headers, rows, title=f"task-driven check: calibrate on {task['domain']} only ({task['tokens']:,} tokens) vs the mixed corpus"))


if __name__ == "__main__":
    main()
