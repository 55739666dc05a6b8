"""Channel pruning inside experts on a trained MoE: every channel scorer x allocation, with and without
compensation, against REAP expert dropping at the same routed-FFN parameter count; calibration cost against
one plain forward and one forward+backward over the same tokens; and, on a GPU, memory and speed of the
pruned models against the unpruned one (bf16, prefill and decode), measured side by side in one run.

Calibrates once on the train split (every method reads the same statistics), evaluates per-domain NLL on the
valid split. Nothing is tuned on the valid split. Prints tables and writes JSON.

    python benchmarks/channel_pruning.py --model ../shared/models/qwen3moe-bench \
        --calib ../shared/data/corpus/train.jsonl.gz --valid ../shared/data/corpus/valid.jsonl.gz
"""

from __future__ import annotations

import copy
import itertools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import calibrate, data_parser, experts_then_channels, mean_nll, quality_run

from moe_fx import compose, state_of
from moe_fx.calibrate.data import TokenBatch
from moe_fx.evaluate.nll import evaluate_nll, model_size
from moe_fx.evaluate.table import format_table, human_bytes
from moe_fx.passes import CompensateExperts, DropExperts, PruneChannels, Score
from moe_fx.rewrite.prune_channels import routed_parameters

OBSERVERS = ("routing", "reap", "channels", "channel_grads", "inputs")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def pass_seconds(model, tokens: TokenBatch, batch_size: int, backward: bool) -> float:
    """One plain forward (or forward + backward of the summed NLL) over ``tokens``: the yardstick."""
    device = str(next(model.parameters()).device)
    _sync(device)
    t0 = time.perf_counter()
    with torch.set_grad_enabled(backward):
        for batch in tokens.batches(batch_size):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            if backward:
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").backward()
    _sync(device)
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0



def prune(base, stats, passes) -> tuple[torch.nn.Module, float]:
    model = copy.deepcopy(base)
    state_of(model).stats = stats
    t0 = time.perf_counter()
    model = compose(*passes)(model)
    return model, time.perf_counter() - t0


@torch.no_grad()
def speed(model, device: str, batch: int, prompt: int, new_tokens: int, repeats: int = 3) -> dict:
    """bf16 prefill (tokens/s) and greedy decode (tokens/s, KV cache) and peak memory on ``device``."""
    model = copy.deepcopy(model).to(device, torch.bfloat16).eval()
    ids = torch.randint(10, model.config.vocab_size - 10, (batch, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    for _ in range(2):  # warm-up: every kernel shape of prefill and decode once
        out = model(input_ids=ids, use_cache=True)
        model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
    del out
    torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        model(input_ids=ids, use_cache=False)
    _sync(device)
    prefill = (time.perf_counter() - t0) / repeats
    out = model(input_ids=ids, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(device)
    decode = time.perf_counter() - t0
    result = {
        "weights_bytes": model_size(model)["bytes"],
        "peak_memory_bytes": torch.cuda.max_memory_allocated(),
        "prefill_tok_s": batch * prompt / prefill,
        "decode_tok_s": batch * new_tokens / decode,
    }
    del model
    torch.cuda.empty_cache()
    return result


def main() -> None:
    ap = data_parser(__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["activation", "weight", "fisher", "heapr", "obs", "coverage"])
    ap.add_argument("--allocations", nargs="+", default=["uniform", "layer", "expert", "coverage"])
    ap.add_argument("--compensate", nargs="+", default=["no", "yes"])
    ap.add_argument("--multiple", type=int, default=64)
    ap.add_argument("--expert-shares", type=float, nargs="*", default=[0.125, 0.25, 0.375],
                    help="combined runs: fraction of experts dropped before the channels")
    ap.add_argument("--combined-methods", nargs="+", default=["fisher", "obs"], help="combined runs: channel scorers after the experts")
    ap.add_argument("--speed", action="store_true", help="also measure bf16 prefill/decode speed and memory (CUDA only)")
    ap.add_argument("--speed-rounds", type=int, default=3, help="rounds over all compared models; each keeps its best")
    ap.add_argument("--out", default="benchmarks/results/channel_pruning.json")
    args = ap.parse_args()

    run = quality_run(args)
    base, tokens, holdout, eval_set, before = run.base, run.tokens, run.holdout, run.eval_set, run.before
    holdout_nll = lambda m: mean_nll(m, holdout, args.batch_size)
    holdout_before = holdout_nll(base)
    domains = [d for d in before if d not in ("mean", "all")]
    routed_before = routed_parameters(base, state_of(base).spec)

    timing = {
        "forward_s": min(pass_seconds(base, tokens, args.batch_size, False) for _ in range(2)),
        "forward_backward_s": min(pass_seconds(base, tokens, args.batch_size, True) for _ in range(2)),
        "calibrate_channels_s": calibrate(base, tokens, args.batch_size, ("channels",)).seconds,
        "calibrate_channels_grads_s": calibrate(base, tokens, args.batch_size, ("channels", "channel_grads")).seconds,
    }
    stats = calibrate(base, tokens, args.batch_size, OBSERVERS)

    runs, models = [], {}

    def record(kind: str, method: str, ratio: float, allocation: str, comp: bool, passes) -> None:
        model, seconds = prune(base, stats, passes + ([CompensateExperts()] if comp else []))
        state = state_of(model)
        after = evaluate_nll(model, eval_set, batch_size=args.batch_size, show_progress=False)
        delta = {d: after[d]["nll"] - before[d]["nll"] for d in domains + ["mean"]}
        train_delta = holdout_nll(model) - holdout_before
        report = next((r.report for r in state.history if r.name == "prune_channels"), {})
        routed = routed_parameters(model, state.spec)
        runs.append({
            "kind": kind, "method": method, "ratio": ratio, "allocation": allocation, "compensate": comp,
            "delta_nll": delta, "holdout_train_delta_nll": train_delta, "worst_domain": max(domains, key=lambda d: delta[d]), "worst_delta": max(delta[d] for d in domains),
            "routed_params": routed, "routed_params_ideal": report.get("routed_params_ideal", routed),
            "removed_stored": 1 - routed / routed_before, "removed_ideal": 1 - report.get("routed_params_ideal", routed) / routed_before,
            "params": model_size(model)["params"], "bytes_bf16": 2 * model_size(model)["params"], "seconds": seconds,
            "widths": sorted({b.experts.intermediate_size for b in state.spec.blocks}),
            "experts": sorted({b.num_experts for b in state.spec.blocks}),
        })
        models[(kind, method, ratio, allocation, comp)] = model
        r = runs[-1]
        print(f"{kind:>8} {method:>10} {ratio:.0%} {allocation:>8} comp={comp!s:5} dNLL {delta['mean']:+.3f} worst {r['worst_delta']:+.3f} "
              f"removed {r['removed_stored']:.1%} (ideal {r['removed_ideal']:.1%}) {seconds:.1f}s", flush=True)

    compensate = [c == "yes" for c in args.compensate]
    for ratio in args.ratios:
        for comp in compensate:
            record("experts", "reap", ratio, "uniform", comp, [Score("reap"), DropExperts(ratio=ratio)])
        for method, allocation, comp in itertools.product(args.methods, args.allocations, compensate):
            record("channels", method, ratio, allocation, comp, [Score(method), PruneChannels(ratio=ratio, allocation=allocation, multiple=args.multiple)])
        # combined: a share of the experts, then channels for the rest of the budget (the split is chosen on
        # the held-out *train* windows, see holdout_train_delta_nll; the valid split only reports)
        for expert_share, method, comp in itertools.product(args.expert_shares, args.combined_methods, compensate):
            if expert_share < ratio:
                record("combined", f"reap {expert_share:.1%} + {method}", ratio, "uniform", comp, experts_then_channels(ratio, expert_share, method))

    speeds = None
    if args.speed and args.device.startswith("cuda"):
        compared = {"unpruned": base}
        for ratio in args.ratios:
            for key in [("channels", "fisher", ratio, "uniform", False), ("channels", "heapr", ratio, "expert", False), ("experts", "reap", ratio, "uniform", False)]:
                if key in models:
                    compared[f"{key[1]} {key[3]} {ratio:.0%}"] = models[key]
        # the process's first decodes run several times slower (GPU warm-up beyond one model's own warm-up):
        # measure every model in rounds and keep each one's best round
        rounds = [{name: speed(m, args.device, 8, 512, 64) for name, m in compared.items()} for _ in range(args.speed_rounds)]
        speeds = {name: max((r[name] for r in rounds), key=lambda s: s["decode_tok_s"]) for name in compared}

    result = {
        "model": args.model, "device": args.device, "calibration_tokens": tokens.num_tokens, "timing": timing,
        "before": {"nll": before, "holdout_train_nll": holdout_before, "params": model_size(base)["params"], "routed_params": routed_before},
        "runs": runs, "speed": speeds, "eval_tokens": eval_set.num_tokens, "dtype": args.dtype, "torch": torch.__version__, "options": vars(args),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print_tables(result)


def print_tables(result: dict) -> None:
    reap = {(r["ratio"], r["compensate"]): r["delta_nll"]["mean"] for r in result["runs"] if r["kind"] == "experts"}
    rows = [
        [r["kind"], r["method"], f"{r['ratio']:.0%}", r["allocation"], "yes" if r["compensate"] else "no", f"{r['holdout_train_delta_nll']:+.3f}", f"{r['delta_nll']['mean']:+.3f}",
         f"{r['delta_nll']['mean'] / reap[(r['ratio'], r['compensate'])]:.2f}x", f"{r['worst_delta']:+.3f} ({r['worst_domain']})",
         f"{r['removed_stored']:.1%}", f"{r['removed_ideal']:.1%}", "/".join(map(str, r["widths"])), f"{r['seconds']:.1f}s"]
        for r in result["runs"]
    ]
    headers = ["kind", "method", "removed", "allocation", "compensate", "dNLL held-out train", "dNLL mean", "vs REAP same", "worst domain",
               "stored removed", "ideal removed", "widths", "score+rewrite"]
    print(format_table(headers, rows, title=f"{result['model']}: before NLL mean {result['before']['nll']['mean']['nll']:.3f}"))
    t = result["timing"]
    print(f"calibration over {result['calibration_tokens']:,} tokens: forward {t['forward_s']:.1f} s, forward+backward {t['forward_backward_s']:.1f} s; "
          f"channels observer {t['calibrate_channels_s']:.1f} s, channels+gradients (Fisher/HEAPr) {t['calibrate_channels_grads_s']:.1f} s "
          f"= {t['calibrate_channels_grads_s'] / t['forward_backward_s']:.2f}x forward+backward")
    if result["speed"]:
        base = result["speed"]["unpruned"]
        rows = [[name, human_bytes(s["weights_bytes"]), human_bytes(s["peak_memory_bytes"]), f"{s['prefill_tok_s']:,.0f}", f"{s['prefill_tok_s'] / base['prefill_tok_s']:.2f}x",
                 f"{s['decode_tok_s']:,.0f}", f"{s['decode_tok_s'] / base['decode_tok_s']:.2f}x"] for name, s in result["speed"].items()]
        print(format_table(["model", "weights", "peak memory", "prefill tok/s", "vs unpruned", "decode tok/s", "vs unpruned"], rows,
                           title="bf16 on the GPU, batch 8, 512-token prompt, 64 decoded tokens"))


if __name__ == "__main__":
    main()
