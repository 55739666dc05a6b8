"""Decode speed of pruned models without the host overhead: a ``StaticCache`` and ``torch.compile`` with CUDA
graphs (``mode="reduce-overhead"``), against the same with ``mode="default"``, side by side in one run.

``deploy_speed.py`` decodes with a ``DynamicCache``; at a few layers its compiled steps spend more time on the
host (guards, launches) than on the GPU, which hides what pruning saves in weight reads. Here each step is one
replayed CUDA graph. Variants and the random-weight Qwen3-30B-A3B-shaped model come from ``deploy_speed.py``,
the timing loop from ``decode.py`` (which compares experts implementations; this script compares pruned
variants of any checkpoint with the stock one).

    python benchmarks/decode_static.py --layers 4
    python benchmarks/decode_static.py --model ../shared/models/qwen3moe-bench
"""

from __future__ import annotations

import argparse
import json
import types
from pathlib import Path

import torch
from decode import decode_ms, forward_for
from deploy_speed import SYNTHETIC, build_synthetic, make_variant

from moe_fx.evaluate.table import format_table
from moe_fx.formats.loading import load_model


def step_ms(model, mode: str, batch: int, args) -> float:
    """Median milliseconds per decode step with the stock ``grouped_mm`` experts, compiled in ``mode``."""
    return decode_ms(model, forward_for(model, "grouped_mm", {"reduce-overhead": "cuda-graphs", "default": "compiled"}[mode]), batch, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=SYNTHETIC, help=f"a checkpoint directory, or {SYNTHETIC!r} (random weights)")
    ap.add_argument("--layers", type=int, default=4, help=f"decoder layers of {SYNTHETIC}")
    ap.add_argument("--variants", nargs="+", default=["unpruned", "experts-25%", "experts-50%", "channels-50%"])
    ap.add_argument("--modes", nargs="+", default=["reduce-overhead", "default"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/decode_static.json")
    ap.set_defaults(device="cuda")  # what decode.decode_ms runs on
    args = ap.parse_args()
    if args.model == SYNTHETIC:
        base = build_synthetic(types.SimpleNamespace(tiny=False, layers=args.layers, seed=args.seed, device="cuda"), torch.bfloat16)
    else:
        base = load_model(args.model, dtype="bfloat16", device="cuda")
    models = {name: make_variant(base, name, args.seed) for name in args.variants}
    ms = {mode: {name: {b: step_ms(m, mode, b, args) for b in args.batches}
                 for name, m in models.items()} for mode in args.modes}
    ref = args.variants[0]
    rows = [[name, mode] + [f"{ms[mode][name][b]:.2f} ({ms[mode][ref][b] / ms[mode][name][b]:.2f}x)" for b in args.batches]
            for mode in args.modes for name in args.variants]
    print(format_table(["variant", "compile mode"] + [f"ms/step b{b} (gain)" for b in args.batches], rows,
                       title=f"decode with StaticCache, {args.model} ({base.config.num_hidden_layers} layers), bf16, {torch.cuda.get_device_name()}"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "layers": base.config.num_hidden_layers, "prompt": args.prompt, "steps": args.steps, "repeats": args.repeats,
            "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    Path(args.out).write_text(json.dumps({"meta": meta, "ms_per_step": ms}, indent=2) + "\n")


if __name__ == "__main__":
    main()
