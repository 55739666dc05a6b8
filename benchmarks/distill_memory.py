"""Distillation's memory at reduced depth: the plan ``moe-fx prune`` prints against the peak the GPU measures.

For each depth of ``--layers``, a random-weight model of the preset's shapes (``synth_checkpoint.PRESETS``)
is built on the device in ``--dtype``; the unpruned model's top-k are cached (``CacheTeacher``, the streamed
recipe's teacher), ``--ratio`` of each layer's experts are dropped (random scores: memory does not depend on
which), and ``Distill(teacher="cached")`` takes ``--steps`` steps of ``--batch-size`` windows in parts of
``--micro-batch`` windows. Measured: the peak GPU memory during distillation against
``moe_fx.rewrite.distill.training_memory`` (weights, gradients, AdamW moments; the teacher is not in memory);
the difference is activations, the teacher cache's batch and the allocator. Two depths give a per-layer slope,
from which the model's full depth is extrapolated beside the plan for it. Prints a table and writes JSON.
``--device cpu`` measures the process's resident set instead (its peak reset before distillation through
``/proc/self/clear_refs``; Linux only), so the full-training and adapter plans can be checked without a GPU.

    python benchmarks/distill_memory.py --preset qwen3-30b-a3b --layers 2 4 --micro-batch 1 4 --out distill_memory.json
    python benchmarks/distill_memory.py --train adapters --rank 16 --device cpu --layers 1 2 --micro-batch 1 --steps 1 --windows 4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from synth_checkpoint import PRESETS, make_config

from moe_fx import compose, state_of
from moe_fx.evaluate.table import format_table
from moe_fx.passes import DropExperts, Score
from moe_fx.rewrite.distill import Distill, training_memory
from moe_fx.rewrite.teacher_cache import CacheTeacher

GIB = 2**30


def measure(config, args, micro: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Plan and measured peak of one distillation at ``config``'s depth."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    spec = state_of(model).spec
    plan = training_memory(model, spec, kept_fraction=1 - args.ratio, train=args.train, rank=args.rank)
    windows = torch.randint(2, config.vocab_size, (args.windows, args.seq_len), generator=torch.Generator().manual_seed(0))
    model = compose(CacheTeacher(windows, top_k=args.top_k, batch_size=micro, show_progress=False),
                    Score("random"), DropExperts(ratio=args.ratio))(model)
    start = _reset_peak(device)
    t0 = time.perf_counter()
    model = Distill(teacher="cached", steps=args.steps, batch_size=args.batch_size, micro_batch_size=micro, lr=1e-3,
                    train=args.train, rank=args.rank, show_progress=False)(model)
    peak = _peak(device)
    seconds = (time.perf_counter() - t0) / args.steps
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"layers": config.num_hidden_layers, "micro_batch": micro, "plan_bytes": sum(plan.values()), "plan": plan,
            "weights_before_bytes": start, "peak_bytes": peak, "beyond_plan_bytes": peak - sum(plan.values()), "seconds_per_step": seconds}


def _reset_peak(device: torch.device) -> int:
    """Start a new peak; returns the bytes held now (allocated on the GPU, resident on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the resident set's high-water mark
    return _proc_status("VmRSS")


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _proc_status("VmHWM")


def _proc_status(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen3-30b-a3b", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, nargs=2, default=[2, 4], help="two depths: the per-layer slope comes from them")
    ap.add_argument("--micro-batch", type=int, nargs="+", default=[1, 4], help="windows per forward and backward")
    ap.add_argument("--batch-size", type=int, default=32, help="windows per optimizer step (--preset best: 32)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--train", default="experts", choices=["experts", "routers", "adapters", "all"])
    ap.add_argument("--rank", type=int, default=16, help="--train adapters: rank of each expert's weight update")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: peak resident set instead of GPU memory (Linux)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tiny", action="store_true", help="the preset's structure at small sizes (a quick run; still on CUDA)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/distill_memory.json"))
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("distill_memory.py --device cuda measures GPU memory: it needs CUDA (or pass --device cpu)")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = [measure(make_config(args.preset, layers, args.tiny), args, micro, device, dtype)
            for micro in args.micro_batch for layers in args.layers]
    full_depth = PRESETS[args.preset]["layers"]
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        meta = AutoModelForCausalLM.from_config(make_config(args.preset, full_depth, args.tiny), dtype=dtype)
    full_plan = sum(training_memory(meta, state_of(meta).spec, kept_fraction=1 - args.ratio, train=args.train, rank=args.rank).values())
    extrapolated = {}
    for micro in args.micro_batch:
        a, b = (r for r in rows if r["micro_batch"] == micro)
        slope = (b["beyond_plan_bytes"] - a["beyond_plan_bytes"]) / (b["layers"] - a["layers"])
        beyond = a["beyond_plan_bytes"] + slope * (full_depth - a["layers"])
        extrapolated[str(micro)] = {"layers": full_depth, "plan_bytes": full_plan, "beyond_plan_bytes": beyond,
                                    "peak_bytes": full_plan + beyond, "beyond_plan_per_layer_bytes": slope}
    print(format_table(
        ["layers", "micro-batch", "plan (weights + trained state)", f"measured peak ({'GPU' if device.type == 'cuda' else 'resident set'})",
         "beyond the plan", "planned beyond the student", "peak - before distillation", "s / step"],
        [[r["layers"], r["micro_batch"], f"{r['plan_bytes'] / GIB:.2f} GiB", f"{r['peak_bytes'] / GIB:.2f} GiB",
          f"{r['beyond_plan_bytes'] / GIB:.2f} GiB", f"{(r['plan_bytes'] - r['plan']['student']) / GIB:.2f} GiB",
          f"{(r['peak_bytes'] - r['weights_before_bytes']) / GIB:.2f} GiB", f"{r['seconds_per_step']:.2f}"] for r in rows]
        + [[f"{full_depth} (extrapolated)", m, f"{e['plan_bytes'] / GIB:.1f} GiB", f"{e['peak_bytes'] / GIB:.1f} GiB",
            f"{e['beyond_plan_bytes'] / GIB:.1f} GiB", "", "", ""] for m, e in extrapolated.items()],
        title=f"{args.preset}: distillation memory, {args.ratio:.0%} of experts dropped, {args.dtype}, steps of {args.batch_size} x {args.seq_len} "
              f"tokens, cached top-{args.top_k} teacher, train={args.train}" + (f" rank {args.rank}" if args.train == "adapters" else "")))
    on_gpu = device.type == "cuda"
    result = {"preset": args.preset, "device": torch.cuda.get_device_name(device) if on_gpu else "cpu", "torch": torch.__version__, "rows": rows,
              "extrapolated": extrapolated, "capacity_bytes": torch.cuda.mem_get_info(device)[1] if on_gpu else None,
              "options": {k: str(v) for k, v in vars(args).items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
