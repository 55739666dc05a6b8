"""Expert substitution (MoNE, arXiv 2507.00390) against dropping, on a trained MoE: is it worth a pass?

MoNE keeps the router whole and replaces each pruned expert by a constant "novice" vector: a token routed to it
gets ``w * c`` instead of ``w * expert(x)``, while dropping re-routes the token to its next-best kept expert.
This script measures both on the same calibration (train split) and valid text, with the experts to prune
chosen by REAP (the very experts the drop rows drop) or by MoNE's own criterion (the substitution error ``sum_t w_t^2 ||y_t - c||^2`` over the
sampled tokens routed to the expert, ``c`` its router-weighted mean output ``sum w^2 y / sum w^2``, the
least-squares constant), each without and with a refit of the kept experts' down projections and of the
novices on the block's original output (the block-coordinate ridge fit of ``CompensateExperts``, routing kept).

Substitution is applied with forward hooks on the experts modules (the pruned experts' weights stay in memory
and are given zero routing weight): it measures quality, not size or speed.

    python benchmarks/expert_substitution.py --model ../shared/models/qwen3moe-bench \
        --calib ../shared/data/corpus/train.jsonl.gz --valid ../shared/data/corpus/valid.jsonl.gz --device cpu
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from common import calibrate, data_parser, quality_run

from moe_fx import compose, state_of
from moe_fx.evaluate.nll import evaluate_nll
from moe_fx.evaluate.table import format_table
from moe_fx.model.expert_math import ExpertMath
from moe_fx.model.spec import MoEBlockSpec
from moe_fx.passes import CompensateExperts, DropExperts, Score
from moe_fx.rewrite.compensate import ridge_refit

OBSERVERS = ("routing", "reap", "inputs")


def block_sample(stats, block: MoEBlockSpec) -> dict[str, torch.Tensor]:
    """The ``inputs`` observer's sampled tokens of ``block``: inputs, recorded routing and the block's output."""
    acc = stats.per_block[block.path]
    n = min(int(acc["input_seen"]), acc["input_hidden"].shape[0])
    return {"x": acc["input_hidden"][:n].double(), "idx": acc["input_topk_index"][:n], "w": acc["input_topk_weight"][:n].double(),
            "target": acc["input_target"][:n].double()}


@torch.no_grad()
def novices(model, block: MoEBlockSpec, sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per expert: the least-squares constant ``c [E, H]`` and its substitution error ``[E]``."""
    math = ExpertMath(model, block.experts)
    x, idx, w = sample["x"], sample["idx"], sample["w"]
    c = torch.zeros(block.num_experts, x.shape[1], dtype=torch.float64)
    error = torch.zeros(block.num_experts, dtype=torch.float64)
    for e in range(block.num_experts):
        t, s = (idx == e).nonzero(as_tuple=True)
        if len(t) == 0:
            continue
        y, ws = math.output(e, x[t]), w[t, s]
        c[e] = (ws[:, None] ** 2 * y).sum(0) / (ws**2).sum()
        error[e] = ((ws[:, None] * (y - c[e])) ** 2).sum() / len(x)
    return c, error


@torch.no_grad()
def refit(model, block: MoEBlockSpec, sample: dict, pruned: set[int], c: torch.Tensor, ridge: float = 1.0, sweeps: int = 2) -> torch.Tensor:
    """Refit the kept experts' down projections (ridge towards the current ones) and the novices on the block's
    original output, routing unchanged; returns the refit novices."""
    math = ExpertMath(model, block.experts)
    x, idx, w, target = sample["x"], sample["idx"], sample["w"], sample["target"]
    c = c.clone()
    contrib = torch.zeros(*idx.shape, x.shape[1], dtype=torch.float64)
    rows = {}
    for e in range(block.num_experts):
        t, s = (idx == e).nonzero(as_tuple=True)
        if len(t):
            rows[e] = (t, s, None if e in pruned else math.activations(e, x[t]))
            contrib[t, s] = w[t, s, None] * (c[e] if e in pruned else math.output(e, x[t]))
    for _ in range(sweeps):
        for e, (t, s, a) in rows.items():
            ws = w[t, s, None]
            residual = target[t] - (contrib[t].sum(1) - contrib[t, s])
            if a is None:
                c[e] = (ws * residual).sum(0) / (ws**2).sum()
                contrib[t, s] = ws * c[e]
                continue
            math.set_down(e, ridge_refit(ws * a, residual, math.down(e, x), ridge))
            contrib[t, s] = ws * math.output(e, x[t])
    return c


def substitute(model, block: MoEBlockSpec, pruned: list[int], c: torch.Tensor) -> None:
    """Hooks on ``block``'s experts: pruned experts get zero routing weight and add ``w * c`` instead."""
    module = model.get_submodule(block.experts.path)
    mask = torch.zeros(block.num_experts, dtype=torch.bool)
    mask[pruned] = True
    table = torch.where(mask[:, None], c, torch.zeros_like(c)).float()
    routed = {}

    def before(mod, args):
        x, idx, w = args
        routed["idx"], routed["w"] = idx, w
        return x, idx, w.masked_fill(mask.to(idx.device)[idx], 0)

    def after(mod, args, out):
        idx, w = routed.pop("idx"), routed.pop("w")
        return out + (w[..., None] * table.to(w)[idx]).sum(1).to(out.dtype)

    module.register_forward_pre_hook(before)
    module.register_forward_hook(after)


def main() -> None:
    ap = data_parser(__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/expert_substitution.json")
    args = ap.parse_args()
    setup = quality_run(args)
    base, before = setup.base, setup.before
    stats = calibrate(base, setup.tokens, args.batch_size, OBSERVERS)
    spec = state_of(copy.deepcopy(base)).spec
    samples = {b.path: block_sample(stats, b) for b in spec.blocks}
    per_block = {b.path: novices(base, b, samples[b.path]) for b in spec.blocks}

    def measured(model) -> dict:
        after = evaluate_nll(model, setup.eval_set, batch_size=args.batch_size, show_progress=False)
        return {"delta_nll": after["mean"]["nll"] - before["mean"]["nll"]}

    rows = []
    for ratio in args.ratios:
        for compensate in (False, True):
            t0 = time.perf_counter()
            model = copy.deepcopy(base)
            state_of(model).stats = stats
            model = compose(Score("reap"), DropExperts(ratio=ratio), *([CompensateExperts()] if compensate else []))(model)
            kept = state_of(model).plan.kept_experts  # the same experts either way: REAP's choice
            rows.append({"ratio": ratio, "rewrite": "drop (re-route)", "chosen_by": "reap", "refit": compensate,
                         **measured(model), "seconds": time.perf_counter() - t0})
            for chosen_by in ("reap", "substitution error"):
                t0 = time.perf_counter()
                model = copy.deepcopy(base)
                for b in spec.blocks:
                    c, error = per_block[b.path]
                    dropped = [e for e in range(b.num_experts) if e not in kept[b.path]]
                    pruned = dropped if chosen_by == "reap" else torch.argsort(error)[: len(dropped)].tolist()
                    if compensate:
                        c = refit(model, b, samples[b.path], set(pruned), c)
                    substitute(model, b, pruned, c)
                rows.append({"ratio": ratio, "rewrite": "substitute (MoNE)", "chosen_by": chosen_by, "refit": compensate,
                             **measured(model), "seconds": time.perf_counter() - t0})
            print(*(f"{r['ratio']:.0%} {r['rewrite']} by {r['chosen_by']} refit={r['refit']}: {r['delta_nll']:+.4f}" for r in rows[-3:]), sep="\n", flush=True)
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
