"""Llama 4's experts: transformers' dense call (every expert on every token) against moe-fx's routed forward
(:mod:`moe_fx.kernels.prescaled`: the routed (token, slot) pairs only), side by side in one process.

A random-weight Llama 4 text model with Llama-4-Scout's layer shapes (hidden 5120, experts 16 x 8192, top-1,
shared expert 8192) divided by ``--shrink`` (1: full size), ``--layers`` deep. Per path, eager and compiled
(``moe_fx.compile``: the routed forward; ``experts_implementation="batched_mm"`` keeps transformers' dense block),
the median seconds of a forward over ``batch x tokens`` (no cache: a prefill at 1 x ``--prefill``, and one-token
steps at batches 1 and 16, which is the decode step's expert work), the logits' largest difference between the
two paths, and the expert bytes each reads per layer (dense: all experts; routed: the distinct experts hit).
Prints a table and writes JSON.

    python benchmarks/prescaled_routed.py --shrink 4 --layers 2 --device cpu
    python benchmarks/prescaled_routed.py --layers 4 --dtype bfloat16        # full Scout shapes, GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

import moe_fx
from moe_fx.evaluate.table import format_table

SCOUT = dict(hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384, num_local_experts=16, num_experts_per_tok=1,
             num_attention_heads=40, num_key_value_heads=8, head_dim=128)
"""Llama-4-Scout-17B-16E's text layer shapes (the hub's config.json)."""


def build(args, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    shapes = {k: (v // args.shrink if k not in ("num_local_experts", "num_experts_per_tok", "num_key_value_heads", "head_dim") else v)
              for k, v in SCOUT.items()}
    kv = shapes["num_key_value_heads"]  # query heads: a multiple of the KV heads that fits the hidden size
    shapes["num_attention_heads"] = max(kv, shapes["hidden_size"] // shapes["head_dim"] // kv * kv)
    config = Llama4TextConfig(**shapes, num_hidden_layers=args.layers, vocab_size=8192, moe_layers=list(range(args.layers)),
                              interleave_moe_layer_step=1, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(args.device):
        model = Llama4ForCausalLM._from_config(config, dtype=dtype)
    with torch.no_grad():  # small normal noise: routing is not degenerate
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.ndim >= 2 else p.fill_(1.0)
    return model.eval()


@torch.no_grad()
def distinct_hits(model: torch.nn.Module, spec, ids: torch.Tensor) -> int:
    """The distinct experts layer 0's router picks for ``ids`` (what the routed path reads)."""
    seen = []
    router = model.get_submodule(spec.blocks[0].router.weight.rsplit(".", 1)[0])
    hook = router.register_forward_hook(lambda _m, _i, out: seen.append(out[1]))
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        hook.remove()
    return len(torch.unique(torch.topk(seen[0], spec.blocks[0].top_k, dim=-1).indices))


def timed(fn, repeats: int, device: str) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after two warm-up runs."""
    times = []
    for i in range(repeats + 2):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shrink", type=int, default=1, help="divide the widths by this (1: Scout's shapes)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/prescaled_routed.json")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    base = build(args, dtype)
    spec = moe_fx.state_of(base).spec
    experts = base.get_submodule(spec.blocks[0].experts.path)
    expert_bytes = (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()) * experts.gate_up_proj.element_size()
    shapes = {f"prefill 1x{args.prefill}": (1, args.prefill), **{f"step b{b}": (b, 1) for b in args.decode_batches}}
    inputs = {name: torch.randint(3, 8000, shape, device=args.device, generator=torch.Generator(args.device).manual_seed(1)) for name, shape in shapes.items()}
    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    paths = {"dense (transformers)": "batched_mm", "routed (moe-fx)": moe_fx.kernels.NAME}
    rows, results, logits = [], [], {}
    for path, implementation in paths.items():
        for mode in modes:
            model = copy.deepcopy(base)
            torch._dynamo.reset()
            run = moe_fx.compile(model, experts_implementation=implementation, dynamic=False) if mode == "compiled" else model
            if mode == "eager" and implementation == moe_fx.kernels.NAME:
                moe_fx.kernels.prescaled.route_prescaled_blocks(model, [b.path for b in spec.blocks])
            for name, ids in inputs.items():
                with torch.no_grad():
                    seconds = timed(lambda run=run, ids=ids: run(input_ids=ids, use_cache=False), args.repeats, args.device)
                    out = run(input_ids=ids, use_cache=False).logits.float()
                logits.setdefault(name, {})[(path, mode)] = out
                read = (spec.blocks[0].num_experts if path.startswith("dense") else distinct_hits(model, spec, ids)) * expert_bytes
                results.append({"path": path, "mode": mode, "shape": name, "seconds": seconds, "tokens_per_s": ids.numel() / seconds,
                                "layer0_expert_bytes_read": read})
                print(json.dumps(results[-1]), flush=True)
    for r in results:
        dense = next(x for x in results if x["shape"] == r["shape"] and x["mode"] == r["mode"] and x["path"].startswith("dense"))
        r["speedup_vs_dense"] = dense["seconds"] / r["seconds"]
        ref = logits[r["shape"]][(next(iter(paths)), "eager")]
        r["max_abs_logit_diff_vs_dense_eager"] = float((logits[r["shape"]][(r["path"], r["mode"])] - ref).abs().max())
        rows.append([r["shape"], r["path"], r["mode"], f"{r['seconds'] * 1e3:.1f}", f"{r['tokens_per_s']:.1f}", f"{r['speedup_vs_dense']:.2f}x",
                     f"{r['layer0_expert_bytes_read'] / 2**20:.0f} MiB", f"{r['max_abs_logit_diff_vs_dense_eager']:.1e}"])
    print(format_table(["forward", "experts path", "mode", "ms", "tok/s", "vs dense", "expert bytes read (layer 0)", "logits diff"], rows,
                       title=f"Llama-4-Scout shapes / {args.shrink}, {args.layers} layers, {args.dtype}, {args.device}"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"options": vars(args), "torch": torch.__version__, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
