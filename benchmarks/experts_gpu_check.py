"""GPU correctness of the ``moe_fx`` experts implementation: logits against transformers' ``eager`` experts on
tiny models of several layouts (standard, GPT-OSS transposed/interleaved with biases, up-only, post-expert
norm, transposed without biases), fp32 and bf16, 1 / few / many tokens, with each kernel forced; then a
whole-graph compile and a CUDA-graph decode with a ``StaticCache``. The CPU test suite covers the rest.

    python benchmarks/experts_gpu_check.py --out benchmarks/results/experts_gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from decode import attempt
from tiny_models import first_experts_call, tiny_model

import moe_fx
from moe_fx.deliver.compile import compile_model
from moe_fx.kernels import moe_fx_experts_forward
from moe_fx.kernels.implementation import set_implementation

FAMILIES = ["qwen3_moe", "gpt_oss", "nemotron_h", "muse_spark", "aria", "mixtral"]
GRAPH_CHECKS = [("qwen3_moe", torch.float32), ("gpt_oss", torch.float32), ("gpt_oss", torch.bfloat16)]
"""(family, dtype) of the compiled / CUDA-graph checks (qwen3_moe in bf16 passed the decode check too)."""
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 6e-2}
"""Max |logit difference| allowed vs eager (logits of these tiny models are O(1))."""


@torch.no_grad()
def logits(model, ids: torch.Tensor, impl: str, kernel: str = "auto") -> torch.Tensor:
    os.environ["MOE_FX_GROUPED_MM"] = kernel
    set_implementation(model, impl)
    return model(input_ids=ids, use_cache=False).logits.float()


@torch.no_grad()
def cuda_graph_decode(model, impl: str, steps: int = 6) -> float:
    """Max |logit difference| between a CUDA-graph (reduce-overhead, fullgraph) decode and an eager one, both
    with experts implementation ``impl`` (Inductor's fused bf16 pointwise ops move logits by themselves: the
    same measure for ``grouped_mm`` is the reference)."""
    os.environ["MOE_FX_GROUPED_MM"] = "auto"
    prompt = torch.randint(3, 100, (2, 5), device="cuda")
    tokens = torch.randint(3, 100, (2, steps), device="cuda")
    outs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        set_implementation(model, impl)
        fwd = compile_model(model, experts_implementation=impl, mode="reduce-overhead", dynamic=False) if compiled else model
        cache = moe_fx.static_cache(model.config, 16, rolling_windows=True)
        model(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(5, device="cuda"), use_cache=True)
        step_logits = []
        for i in range(steps):
            out = fwd(input_ids=tokens[:, i : i + 1], past_key_values=cache, cache_position=torch.tensor([5 + i], device="cuda"), use_cache=True)
            step_logits.append(out.logits.float().clone())
        outs.append(torch.cat(step_logits, 1))
    return (outs[0] - outs[1]).abs().max().item()


@torch.no_grad()
def compiled_experts(family: str, dtype: torch.dtype) -> dict[str, float]:
    """Max |difference| between the moe_fx experts call compiled (fullgraph; CUDA graphs) and eager, on the
    inputs one real forward passes it (2 and 40 tokens): no routing can differ here."""
    model = tiny_model(family).to("cuda", dtype)
    set_implementation(model, "moe_fx")
    out = {}
    for tokens in (2, 40):
        experts, (h, idx, w) = first_experts_call(model, torch.randint(3, 100, (1, tokens), device="cuda"))
        ref = moe_fx_experts_forward(experts, h, idx, w).float()
        torch._dynamo.reset()
        fn = torch.compile(moe_fx_experts_forward, fullgraph=True, dynamic=False, mode="reduce-overhead")
        for _ in range(3):  # CUDA graphs record on a later call
            got = fn(experts, h, idx, w).float().clone()
        out[f"{tokens} tokens"] = (got - ref).abs().max().item()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/experts_gpu_check.json")
    ap.add_argument("--graphs-only", action="store_true", help="only the compiled / CUDA-graph checks")
    args = ap.parse_args()
    results, failures = [], []
    for family in [] if args.graphs_only else FAMILIES:
        for dtype in (torch.float32, torch.bfloat16):
            model = tiny_model(family).to("cuda", dtype)
            for tokens in (1, 5, 300):
                ids = torch.randint(3, 100, (1, tokens), device="cuda")
                ref = logits(model, ids, "eager")
                kernels = ["auto", "triton"] + (["native"] if dtype == torch.bfloat16 else [])
                for kernel in kernels:
                    err = (logits(model, ids, "moe_fx", kernel) - ref).abs().max().item()
                    results.append({"family": family, "dtype": str(dtype), "tokens": tokens, "kernel": kernel, "max_abs": err})
                    if not err <= TOLERANCE[dtype]:
                        failures.append(results[-1])
                stock = (logits(model, ids, "grouped_mm") - ref).abs().max().item() if dtype == torch.bfloat16 else None
                print(family, dtype, tokens, [r["max_abs"] for r in results[-len(kernels):]], "stock grouped_mm:", stock, flush=True)
    graphs, experts_only = {}, {}
    for family, dtype in GRAPH_CHECKS:
        key = f"{family} {dtype}"
        experts_only[key] = compiled_experts(family, dtype)
        print(key, "compiled experts call vs eager, same inputs:", experts_only[key], flush=True)
        model = tiny_model(family).to("cuda", dtype)
        # a failing row must not hide the rows after it (transformers' own fp32 grouped_mm fallback calls
        # offs.tolist(), which CUDA-graph capture refuses)
        graphs[key] = {impl: attempt(lambda: cuda_graph_decode(model, impl)) for impl in ("moe_fx", "grouped_mm")}
        print(key, "cuda-graph decode vs eager:", graphs[key], flush=True)
        # bf16 decode: a rounding difference can flip a near-tied top-k choice, and the step's logits then
        # differ by a whole expert's contribution; fp32 and the experts call alone have no such excuse
        if dtype == torch.float32 and not (isinstance(graphs[key]["moe_fx"], float) and graphs[key]["moe_fx"] <= TOLERANCE[dtype]):
            failures.append({"check": key, "cuda_graph_decode": graphs[key]})
        if not max(experts_only[key].values()) <= TOLERANCE[dtype]:
            failures.append({"check": key, "compiled_experts": experts_only[key]})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "checks": results,
                                          "cuda_graph_decode_max_abs": graphs,
                                          "compiled_experts_max_abs": experts_only, "failures": failures}, indent=1) + "\n")
    print("FAILURES:", failures if failures else "none")


if __name__ == "__main__":
    main()
