"""Stock transformers loading moe-fx's fp8-block checkpoints on a GPU (its FP8 path) against the same checkpoints
loaded without a device map, logits and greedy tokens; one JSON entry per checkpoint (a load that fails is recorded).
Run on the H200 (transformers 5.23) on .device/fp8/{micro-reap50-fp8,mixtral-fp8,qwen2_moe-fp8,qwen3_moe-fp8}: every load
failed there (see docs/formats.md), which is what the JSON in benchmarks/results/quantize/ records.

    python benchmarks/fp8_gpu_check.py DIR [DIR ...] --out benchmarks/results/quantize/fp8_gpu_load.json
"""

import argparse
import json
import traceback

import torch
from transformers import AutoModelForCausalLM

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("dirs", nargs="+")
ap.add_argument("--out", required=True)
args = ap.parse_args()
out = {}
for d in args.dirs:
    try:
        ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
        cpu = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, trust_remote_code=True)
        gpu = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, device_map="cuda", trust_remote_code=True)
        kinds = sorted({type(m).__name__ for m in gpu.modules() if "FP8" in type(m).__name__ or "Experts" in type(m).__name__})
        with torch.no_grad():
            a = cpu(ids).logits.float()
            b = gpu(ids.cuda()).logits.float().cpu()
            ga = cpu.generate(ids[:1], max_new_tokens=16, do_sample=False)
            gb = gpu.generate(ids[:1].cuda(), max_new_tokens=16, do_sample=False).cpu()
        out[d] = {"modules": kinds, "max_abs_logit_diff": float((a - b).abs().max()), "logit_scale": float(a.abs().max()),
                  "greedy_identical": bool(torch.equal(ga, gb)), "expert_dtype": str(next(p.dtype for n, p in gpu.named_parameters() if "experts" in n))}
    except Exception as e:  # a checkpoint that fails to load is a result
        traceback.print_exc()
        out[d] = {"error": str(e)[:300]}
    print(d, out[d], flush=True)
with open(args.out, "w") as f:
    json.dump(out, f, indent=2)
