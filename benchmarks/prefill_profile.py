"""Where a compiled prefill's time goes, stock ``grouped_mm`` experts vs ``moe_fx``: device kernels and host
operators of three 8 x 512 forwards (random-weight Qwen3-30B-A3B layer shapes, bf16; GPU).

    python benchmarks/prefill_profile.py --layers 4 > benchmarks/results/decode_h200/prefill_profile.log
"""

from __future__ import annotations

import argparse
import types

import torch
from common import print_profile
from decode import forward_for
from deploy_speed import build_synthetic, random_ids


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prefill", type=int, nargs=2, default=[8, 512], metavar=("BATCH", "LENGTH"))
    args = ap.parse_args()
    model = build_synthetic(types.SimpleNamespace(tiny=False, layers=args.layers, seed=0, device="cuda"), torch.bfloat16)
    ids = random_ids(tuple(args.prefill), model.config.vocab_size, 7, "cuda")
    for impl in ("grouped_mm", "moe_fx"):
        forward = forward_for(model, impl, "compiled")

        def run() -> None:
            for _ in range(3):
                forward(input_ids=ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()

        run()  # compiles and warms up
        print_profile(f"{impl} compiled prefill {args.prefill[0]}x{args.prefill[1]}, 3 forwards", run, "cuda",
                      ("self_cuda_time_total", "self_cpu_time_total"), rows=16)


if __name__ == "__main__":
    main()
