"""transformers' own static-cache generation (``generate(cache_implementation="static")``, which compiles the
forward and replays it in CUDA graphs) on a random-weight model with Qwen3-30B-A3B layer shapes, with one
experts implementation per process: run it once per implementation, so a crash of one does not hide the other.

    python benchmarks/generate_static.py --impl moe_fx --out benchmarks/results/generate_static_moe_fx.json
"""

from __future__ import annotations

import argparse
import json
import time
import types
from pathlib import Path

import torch
from deploy_speed import build_synthetic, random_ids

from moe_fx.kernels.implementation import IMPLEMENTATIONS, set_implementation


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impl", required=True, choices=IMPLEMENTATIONS)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model = build_synthetic(types.SimpleNamespace(tiny=False, layers=args.layers, seed=0, device="cuda"), torch.bfloat16)
    set_implementation(model, args.impl)
    ids = random_ids((args.batch, args.prompt), model.config.vocab_size, 5, "cuda")
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, cache_implementation="static")
    times = []
    for _ in range(args.repeats + 1):  # the first call compiles and records
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = sorted(times[1:])[len(times[1:]) // 2]
    result = {"impl": args.impl, "device": torch.cuda.get_device_name(), "torch": torch.__version__, **vars(args),
              "seconds": seconds, "first_call_seconds": times[0], "new_tok_s": args.batch * args.new_tokens / seconds,
              "generated": int(out.shape[1] - args.prompt)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
