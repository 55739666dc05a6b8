"""Distillation recovery (moe_fx.rewrite.distill.Distill) after the best one-shot pipelines, on a trained MoE.

Each pipeline prunes a copy of the base model with calibration statistics shared by all (train split), then
Distill fine-tunes it towards the unpruned model's logits on the calibration windows, once per learning rate
of ``--lrs``. The learning rate is chosen on held-out *train* windows (NLL); the valid split only reports,
for every learning rate, so the choice can be checked. EEP's fitness windows are another held-out slice.
``--teachers model cached``: each distillation also runs from the unpruned model's top-``--top-k`` distributions
cached before pruning (``CacheTeacher``; no teacher in memory while training), side by side with the full-KL one.

    python benchmarks/distill_recovery.py --model ../shared/models/qwen3moe-bench \
        --calib ../shared/data/corpus/train.jsonl.gz --valid ../shared/data/corpus/valid.jsonl.gz
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from common import calibrate, data_parser, experts_then_channels, mean_nll, quality_run

from moe_fx import compose, state_of
from moe_fx.evaluate.generation import agreement, generation_prompts
from moe_fx.evaluate.generation import reference as generation_reference
from moe_fx.evaluate.nll import evaluate_nll, model_size
from moe_fx.evaluate.table import format_table
from moe_fx.passes import CompensateExperts, DropExperts, PruneChannels, Score
from moe_fx.plan.eep import EvolutionarySearch
from moe_fx.rewrite.distill import Distill
from moe_fx.rewrite.prune_channels import routed_parameters
from moe_fx.rewrite.teacher_cache import CacheTeacher

OBSERVERS = ("routing", "reap", "inputs", "channels", "channel_grads")


def pipelines(args, fitness: torch.Tensor) -> dict[str, list]:
    """The one-shot pipelines distillation starts from: the best of issues 4 and 5, and REAP for reference."""
    def eep():
        return EvolutionarySearch(fitness, population=args.eep_population, generations=args.eep_generations, allocation="global",
                                  batch_size=args.batch_size, seed=0, show_progress=False)

    out = {
        "reap 25%": [Score("reap"), DropExperts(ratio=0.25)],
        "reap 25% + comp": [Score("reap"), DropExperts(ratio=0.25), CompensateExperts()],
        "reap 50%": [Score("reap"), DropExperts(ratio=0.5)],
        "eep global 25% + comp": [Score("reap"), DropExperts(ratio=0.25, allocation=eep()), CompensateExperts()],
        "reap 50% + comp": [Score("reap"), DropExperts(ratio=0.5), CompensateExperts()],
        # a quarter of the experts, then channels: widths are multiples of 8 (128 -> 88 or 80 on the bench model)
        "reap 25% experts + fisher 1/3 channels (48.4% routed) + comp": [*experts_then_channels(0.5, 0.25, "fisher"), CompensateExperts()],
        "reap 25% experts + fisher 37.5% channels (53.1% routed) + comp": [
            Score("reap"), DropExperts(ratio=0.25), Score("fisher"), PruneChannels(ratio=0.375), CompensateExperts()],
        # one width per layer, the layers' total within the budget of exactly half the routed parameters
        "reap 25% experts + fisher per-layer widths (50% routed) + comp": [
            *experts_then_channels(0.5, 0.25, "fisher", allocation="layer"), CompensateExperts()],
    }
    return {k: v for k, v in out.items() if k in args.pipelines} if args.pipelines else out


def main() -> None:
    ap = data_parser(__doc__.splitlines()[0])
    ap.add_argument("--pipelines", nargs="*", default=None, help="names of the pipelines to run (default: all)")
    ap.add_argument("--references", nargs="*", default=["reap 25%", "reap 50%"],
                    help="pipelines measured one-shot only: the REAP rows every ratio is taken against")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--distill-batch-size", type=int, default=None,
                    help="windows per distillation step, run in parts of --batch-size (default: --batch-size); the student trains on "
                         "all --calib-tokens")
    ap.add_argument("--lrs", type=float, nargs="*", default=[1e-4, 3e-4], help="peak learning rates (none: one-shot rows only)")
    ap.add_argument("--train", default="experts", choices=["experts", "routers", "adapters", "all"])
    ap.add_argument("--rank", type=int, default=16, help="--train adapters: rank of each expert's weight update")
    ap.add_argument("--teachers", nargs="+", default=["model"], choices=["model", "cached"],
                    help="model: full-vocabulary KL to the unpruned model in memory; cached: its top-k cached before pruning")
    ap.add_argument("--top-k", type=int, default=64, help="tokens per position in the teacher cache (--teachers cached)")
    ap.add_argument("--generate", type=int, default=0,
                    help="greedy continuations (32 tokens after 64 of a valid window) per model compared with the unpruned model's (0: off)")
    ap.add_argument("--eep-population", type=int, default=16)
    ap.add_argument("--eep-generations", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/distill_recovery.json")
    args = ap.parse_args()

    setup = quality_run(args)
    base, tokens, eval_set, before = setup.base, setup.tokens, setup.eval_set, setup.before
    fitness, selection = setup.holdout[: len(setup.holdout) // 2], setup.holdout[len(setup.holdout) // 2 :]
    domains = [d for d in before if d not in ("mean", "all")]
    selection_nll = lambda m: mean_nll(m, selection, args.batch_size)
    selection_before = selection_nll(base)
    stats = calibrate(base, tokens, args.batch_size, OBSERVERS)
    gen_ref = generation_reference(base, generation_prompts(eval_set, prompts=args.generate, prompt_len=64), 32, batch_size=args.batch_size) if args.generate else None
    cache = None
    if "cached" in args.teachers:  # one teacher pass over the distillation windows, shared by every cached run
        t0 = time.perf_counter()
        CacheTeacher(tokens, top_k=args.top_k, batch_size=args.batch_size, show_progress=False).run(base, state_of(base))
        cache = state_of(base).teacher_cache
        print(f"teacher cache: top-{args.top_k}, {cache.summary()} in {time.perf_counter() - t0:.1f}s", flush=True)

    def measured(model, seconds: float, **extra) -> dict:
        after = evaluate_nll(model, eval_set, batch_size=args.batch_size, show_progress=False)
        delta = {d: after[d]["nll"] - before[d]["nll"] for d in domains + ["mean"]}
        gen = {"generation": agreement(model, gen_ref, batch_size=args.batch_size)} if gen_ref is not None else {}
        return {"delta_nll": delta, "worst_delta": max(delta[d] for d in domains), "worst_domain": max(domains, key=lambda d: delta[d]),
                "selection_delta_nll": selection_nll(model) - selection_before, "seconds": seconds, **gen, **extra}

    runs = []
    for name, passes in pipelines(args, fitness).items():
        model = copy.deepcopy(base)
        state_of(model).stats = stats
        t0 = time.perf_counter()
        model = compose(*passes)(model)
        run = {"pipeline": name, "params": model_size(model)["params"], "routed_params": routed_parameters(model, state_of(model).spec),
               "widths": [b.experts.intermediate_size for b in state_of(model).spec.blocks], "one_shot": measured(model, time.perf_counter() - t0), "distilled": {}}
        print(f"{name:>46} one-shot      dNLL {run['one_shot']['delta_nll']['mean']:+.4f} (selection {run['one_shot']['selection_delta_nll']:+.4f})", flush=True)
        for lr in [] if name in args.references else args.lrs:
            for kind in args.teachers:  # "distilled" keeps the model teacher's rows (the lr choice), "distilled_cached" the cache's
                student = copy.deepcopy(model)
                t0 = time.perf_counter()
                student = Distill(teacher=base if kind == "model" else cache, data=tokens, steps=args.steps, lr=lr,
                                  batch_size=args.distill_batch_size or args.batch_size, micro_batch_size=args.batch_size,
                                  train=args.train, rank=args.rank, show_progress=False)(student)
                report = state_of(student).history[-1].report
                r = measured(student, time.perf_counter() - t0, kl_first=report["kl_first"], kl_last=report["kl_last"], teacher=report["teacher"])
                run.setdefault("distilled" if kind == "model" else "distilled_cached", {})[str(lr)] = r
                print(f"{name:>46} distill lr={lr:g} ({report['teacher']}) dNLL {r['delta_nll']['mean']:+.4f} (selection {r['selection_delta_nll']:+.4f}) "
                      f"KL {r['kl_first']:.3f} -> {r['kl_last']:.3f} {r['seconds']:.0f}s", flush=True)
                del student
        chosen_from = run["distilled"] or run.get("distilled_cached", {})
        run["chosen_lr"] = min((float(k) for k in chosen_from), key=lambda lr: chosen_from[str(lr)]["selection_delta_nll"], default=None)
        runs.append(run)
        del model
        result = {"model": args.model, "device": args.device, "dtype": args.dtype, "torch": torch.__version__, "calibration_tokens": tokens.num_tokens,
                  "selection_tokens": int(selection.numel()), "fitness_tokens": int(fitness.numel()), "before": before, "runs": runs, "options": vars(args)}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")  # kept after every pipeline
    reference = {r["pipeline"]: r["one_shot"]["delta_nll"]["mean"] for r in runs if r["pipeline"] in args.references}

    def versus_reap(name: str, delta: float) -> str:
        """``delta`` as a multiple of REAP's loss at the pipeline's budget (a quarter of the experts, or half the
        routed parameters), where that REAP row ran."""
        ref = reference.get("reap 25%" if "25%" in name and "routed" not in name else "reap 50%")
        return f"{delta / ref:.2f}x" if ref else "-"

    rows = []
    for r in runs:
        chosen = r["distilled"].get(str(r["chosen_lr"]))
        cached = r.get("distilled_cached", {}).get(str(r["chosen_lr"]))
        one_shot = r["one_shot"]["delta_nll"]["mean"]
        gen = lambda m: f"{100 * m['generation']['token_match']:.0f}%" if m and "generation" in m else "-"
        rows.append([r["pipeline"], f"{one_shot:+.4f} ({versus_reap(r['pipeline'], one_shot)})", f"{gen(r['one_shot'])} -> {gen(chosen)}"]
                    + ([f"{chosen['delta_nll']['mean']:+.4f} ({versus_reap(r['pipeline'], chosen['delta_nll']['mean'])})", f"{chosen['worst_delta']:+.4f}",
                        f"{r['chosen_lr']:g}", f"{chosen['seconds']:.0f}"] if chosen else ["-"] * 4)
                    + [f"{cached['delta_nll']['mean']:+.4f} ({cached['seconds']:.0f} s)" if cached else "-"])
    print(format_table(["pipeline", "one-shot dNLL (x REAP)", "tokens as unpruned (one-shot -> distilled)", "+ distill dNLL (x REAP)", "worst domain", "lr (train holdout)", "distill s",
                        f"cached top-{args.top_k} dNLL"], rows,
                       title=f"distillation recovery, {args.steps} steps x {args.distill_batch_size or args.batch_size} x {args.seq_len} tokens "
                       f"(of {tokens.num_tokens:,} calibration tokens), train={args.train}"
                       + (f" rank {args.rank}" if args.train == "adapters" else "")))


if __name__ == "__main__":
    main()
