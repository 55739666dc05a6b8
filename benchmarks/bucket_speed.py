"""Speed of per-expert widths stored in width buckets, side by side with the same widths zero-padded and with one
width for every expert at the same share of channels removed, in one run.

Variants of one base model (seeded random kept channels: which channels are kept does not change speed):

- ``uniform``: every expert keeps ``1 - ratio`` of its channels (a stock checkpoint's shapes);
- ``padded``: each layer's experts in four equal groups keeping ``(1 - ratio) x (0.55, 0.85, 1.15, 1.45)`` of their
  channels (capped at the width, multiples of 8), zero-padded to the layer's widest: how per-expert widths are held in
  memory while pruning, and stored with ``--expert-storage padded``;
- ``buckets``: the same widths in width buckets (:mod:`moe_fx.formats.ragged`), as ``moe_fx.load`` holds a bucketed
  checkpoint.

Per variant: weight bytes, prefill tokens/s (``--batch`` x ``--seq``, last-position logits) and decode tokens/s
(``--decode-batch`` rows, a ``--prompt``-token prompt, then ``--decode-steps`` single-token steps with a
``DynamicCache``), eager with ``--impl``; medians of ``--repeats`` after a warm-up. Prints a table, writes JSON.

    python benchmarks/bucket_speed.py --model qwen3-30b-shapes --layers 2 --device cuda          # Qwen3-30B-A3B layer shapes
    python benchmarks/bucket_speed.py --model ../shared/models/qwen3moe-bench --device cpu --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch
from deploy_speed import SYNTHETIC, add_model_arguments, build_synthetic, random_ids, timed
from transformers import DynamicCache

from moe_fx import load, state_of
from moe_fx.evaluate.nll import model_size
from moe_fx.evaluate.table import format_table
from moe_fx.formats.ragged import bucket_experts_, plan_storage
from moe_fx.kernels.implementation import IMPLEMENTATIONS, set_implementation
from moe_fx.passes import PruneChannels
from moe_fx.plan.plans import WIDTH_ALIGN, ChannelPlan

SPREAD = (0.55, 0.85, 1.15, 1.45)
"""Width of each quarter of a layer's experts, as a multiple of the uniform width: the mean is 1 (the same budget)."""


def kept_channels(spec, ratio: float, spread: tuple[float, ...], seed: int) -> ChannelPlan:
    """Random kept channels: each layer's experts in ``len(spread)`` equal groups, group ``i`` keeping
    ``(1 - ratio) x spread[i]`` of the width (a multiple of 8, at most the width)."""
    g = torch.Generator().manual_seed(seed)
    kept = {}
    for b in spec.blocks:
        width = b.experts.intermediate_size
        widths = [min(width, max(WIDTH_ALIGN, WIDTH_ALIGN * round(width * (1 - ratio) * spread[e * len(spread) // b.num_experts] / WIDTH_ALIGN)))
                  for e in range(b.num_experts)]
        kept[b.path] = [sorted(torch.randperm(width, generator=g)[:w].tolist()) for w in widths]
    return ChannelPlan(kept, multiple=WIDTH_ALIGN)


def variants(base: torch.nn.Module, ratio: float, seed: int) -> dict[str, torch.nn.Module]:
    spec = state_of(base).spec
    uniform, padded = copy.deepcopy(base), copy.deepcopy(base)
    PruneChannels(plan=kept_channels(spec, ratio, (1.0,), seed))(uniform)
    PruneChannels(plan=kept_channels(spec, ratio, SPREAD, seed))(padded)
    bucketed = copy.deepcopy(padded)
    pruned = state_of(bucketed).spec
    bucket_experts_(bucketed, pruned, plan_storage(bucketed, pruned, min_saving=0.0)[0])
    return {"uniform": uniform, "padded": padded, "buckets": bucketed}


def median_seconds(fn, args) -> float:
    for _ in range(args.warmup):
        fn()
    return statistics.median(timed(fn, args.device) for _ in range(args.repeats))


def measure(model: torch.nn.Module, args, vocab: int) -> dict:
    ids = random_ids((args.batch, args.seq), vocab, 0, args.device)
    prompt = random_ids((args.decode_batch, args.prompt), vocab, 1, args.device)
    steps = random_ids((args.decode_batch, args.decode_steps), vocab, 2, args.device).split(1, dim=1)

    def decode() -> float:
        """Seconds of the single-token steps, after an untimed prompt into a fresh cache."""
        cache = DynamicCache(config=model.config)
        model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return timed(lambda: [model(input_ids=step, past_key_values=cache, use_cache=True) for step in steps], args.device)

    with torch.no_grad():
        prefill_s = median_seconds(lambda: model(input_ids=ids, logits_to_keep=1), args)
        for _ in range(args.warmup):
            decode()
        decode_s = statistics.median(decode() for _ in range(args.repeats))
    return {"weight_bytes": model_size(model)["bytes"], "prefill_tok_s": args.batch * args.seq / prefill_s,
            "decode_tok_s": args.decode_batch * args.decode_steps / decode_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(ap, layers=2)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--ratio", type=float, default=0.25, help="share of the routed channels removed")
    ap.add_argument("--impl", default="moe_fx", choices=IMPLEMENTATIONS, help="experts implementation (every variant, every bucket)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--decode-batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/bucket_speed.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    base = build_synthetic(args, dtype) if args.model == SYNTHETIC else load(args.model, dtype=str(dtype).removeprefix("torch."), device=args.device)
    results = {}
    for name, model in variants(base, args.ratio, args.seed).items():
        set_implementation(model, args.impl)
        results[name] = measure(model.to(args.device).eval(), args, base.config.vocab_size)
        del model
    ref = results["uniform"]
    rows = [[name, f"{r['weight_bytes'] / 2**20:,.1f}", f"{r['prefill_tok_s']:,.0f} ({r['prefill_tok_s'] / ref['prefill_tok_s']:.2f}x)",
             f"{r['decode_tok_s']:,.1f} ({r['decode_tok_s'] / ref['decode_tok_s']:.2f}x)"] for name, r in results.items()]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(format_table(["variant", "weights MiB", f"prefill tok/s ({args.batch}x{args.seq})", f"decode tok/s (batch {args.decode_batch})"], rows,
                       title=f"{args.model}: {args.ratio:.0%} of routed channels removed, {args.impl} experts, {dtype}, {device}"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"options": vars(args), "device": device, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
