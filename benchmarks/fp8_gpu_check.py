"""moe-fx's fp8-block checkpoints on a GPU: stock transformers' own FP8 path, and ``moe_fx.load`` (FP8 experts run
by the moe_fx kernels), each against the same checkpoint loaded by stock transformers on the CPU (dequantized to
bfloat16 by transformers' own dequantizing path): logits and greedy tokens; one JSON entry per checkpoint and loader (a load that fails is recorded).

    python benchmarks/fp8_gpu_check.py DIR [DIR ...] --out benchmarks/results/quantize/fp8_gpu_load.json

On the H200 (transformers 5.23, no network) stock transformers' GPU path needs the ``kernels`` package and its
hub kernel ``kernels-community/finegrained-fp8``, which that machine cannot download; per-layer expert counts
also fail its shape checks (see docs/formats.md).
"""

import argparse
import json
import traceback

import torch
from transformers import AutoModelForCausalLM

from moe_fx.formats.loading import load_model


def compare(cpu, gpu, ids: torch.Tensor) -> dict:
    with torch.no_grad():
        a = cpu(ids).logits.float()
        b = gpu(ids.cuda()).logits.float().cpu()
        ga = cpu.generate(ids[:1], max_new_tokens=16, do_sample=False)
        gb = gpu.generate(ids[:1].cuda(), max_new_tokens=16, do_sample=False).cpu()
    experts = next(p for n, p in gpu.named_parameters() if "experts" in n)
    return {"max_abs_logit_diff": float((a - b).abs().max()), "logit_scale": float(a.abs().max()),
            "greedy_identical": bool(torch.equal(ga, gb)), "expert_dtype": str(experts.dtype)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = {}
    loaders = {
        "stock_transformers": lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, device_map="cuda", trust_remote_code=True),
        "moe_fx_load": lambda d: load_model(d, dtype="bfloat16", device="cuda"),
    }
    for d in args.dirs:
        ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
        # the reference: dequantized on the CPU (stock ``from_pretrained`` without a device map keeps FP8 modules on
        # the CPU when the machine has a GPU, and their forward needs the missing kernel too)
        cpu = load_model(d, dtype="bfloat16", device="cpu", quantize=None)
        out[d] = {}
        for name, load in loaders.items():
            try:
                out[d][name] = compare(cpu, load(d), ids)
            except Exception as e:  # a checkpoint that fails to load is a result
                traceback.print_exc()
                out[d][name] = {"error": str(e)[:300]}
            print(d, name, out[d][name], flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
