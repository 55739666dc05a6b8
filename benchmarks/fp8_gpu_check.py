"""moe-fx's fp8-block checkpoints on a GPU: stock transformers' own FP8 path, and ``moe_fx.load`` (FP8 experts run
by the moe_fx kernels), each against the same checkpoint loaded by stock transformers on the CPU (dequantized to
bfloat16 by transformers' own dequantizing path), and against each other: logits, greedy tokens and the NLL of
each next token (on real text with ``--text``, for trained checkpoints); one JSON entry per checkpoint and loader
(a load that fails is recorded).

    python benchmarks/fp8_gpu_check.py DIR [DIR ...] --out benchmarks/results/quantize/fp8_gpu_load_DEVICE.json \\
        [--kernel-dir DIR] [--text VALID.jsonl.gz]

Stock transformers' FP8 path runs its FP8 matrix products in the hub kernel ``kernels-community/finegrained-fp8``
(Triton), which the ``kernels`` package downloads on first use. A GPU machine without network can take it from a
local copy of that kernel's package (``--kernel-dir``: the folder holding ``finegrained_fp8/``, with the
``_ops.py`` the kernel builder would generate); the copy is loaded where transformers would load the hub's. Made
from a clone of github.com/huggingface/kernels-community (the package is pure Triton):

    mkdir -p kernel/finegrained_fp8 && cp kernels-community/finegrained-fp8/torch-ext/finegrained_fp8/*.py kernel/finegrained_fp8/
    printf 'import torch\nops = torch.ops._finegrained_fp8_local\ndef add_op_namespace_prefix(name):\n    return "_finegrained_fp8_local::" + name\n' > kernel/finegrained_fp8/_ops.py

Run on an H100 with ``--kernel-dir`` (results in ``benchmarks/results/quantize/fp8_gpu_load_h100_*.json``, table in
docs/formats.md).
"""

import argparse
import importlib
import json
import sys
import traceback

import torch
from transformers import AutoModelForCausalLM

from moe_fx.formats.loading import load_model


def logits_and_greedy(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(ids.to(device)).logits.float().cpu()
        greedy = model.generate(ids[:1, :16].to(device), max_new_tokens=16, do_sample=False).cpu()
    return logits, greedy, ids


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean NLL (nats) of each next token under ``logits`` (meaningful on real text, ``--text``)."""
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()))


def compare(reference: tuple, other: tuple) -> dict:
    (a, ga, ids), (b, gb, _) = reference, other
    diff = (a - b).abs().flatten()
    return {"max_abs_logit_diff": float(diff.max()), "p999_abs_logit_diff": float(diff.kthvalue(max(1, int(0.999 * diff.numel()))).values),
            "mean_abs_logit_diff": float(diff.mean()), "logit_scale": float(a.abs().max()),
            "greedy_identical": bool(torch.equal(ga, gb)), "nll": next_token_nll(b, ids), "nll_reference": next_token_nll(a, ids)}


def token_ids(directory: str, text: str | None) -> torch.Tensor:
    """Random ids (random-weight checkpoints), or 8 windows of 128 tokens of ``text`` (a trained checkpoint's
    held-out text, tokenized by its tokenizer), which make the NLL of each loader comparable."""
    if text is None:
        return torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    from moe_fx.calibrate.data import pack, read_documents
    from moe_fx.formats.loading import load_tokenizer

    return pack(load_tokenizer(directory), read_documents(text), seq_len=128, max_tokens=8 * 128, seed=0)


def use_local_kernel(folder: str) -> None:
    """transformers' FP8 integration loads ``finegrained-fp8`` from ``folder`` instead of the hub."""
    from transformers.integrations import finegrained_fp8

    sys.path.insert(0, folder)
    kernel = importlib.import_module("finegrained_fp8")
    finegrained_fp8.is_kernels_available = lambda: True
    finegrained_fp8.lazy_load_kernel = lambda name: kernel if name == "finegrained-fp8" else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--kernel-dir", help="a local copy of the finegrained-fp8 hub kernel (no network)")
    ap.add_argument("--text", help="held-out text (.jsonl.gz, .txt) for trained checkpoints: logits and NLL on it instead of random ids")
    args = ap.parse_args()
    if args.kernel_dir:
        use_local_kernel(args.kernel_dir)
    loaders = {
        "stock_transformers": lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, device_map="cuda", trust_remote_code=True),
        "moe_fx_load": lambda d: load_model(d, dtype="bfloat16", device="cuda"),
    }
    out = {"kernel": "local copy of kernels-community/finegrained-fp8" if args.kernel_dir else "hub"}
    for d in args.dirs:
        ids = token_ids(d, args.text)
        reference = logits_and_greedy(load_model(d, dtype="bfloat16", device="cpu", quantize=None), ids)
        out[d], results = {}, {}
        for name, load in loaders.items():
            try:
                model = load(d)
                experts = [type(m).__name__ for n, m in model.named_modules() if n.endswith(".experts")]
                results[name] = logits_and_greedy(model, ids)
                out[d][name] = compare(reference, results[name]) | {"experts_modules": sorted(set(experts))}
                del model
            except Exception as e:  # a checkpoint that fails to load or run is a result
                traceback.print_exc()
                out[d][name] = {"error": str(e)[:300]}
            print(d, name, out[d][name], flush=True)
        if len(results) == 2:
            out[d]["stock_vs_moe_fx"] = compare(results["stock_transformers"], results["moe_fx_load"])
            print(d, "stock_vs_moe_fx", out[d]["stock_vs_moe_fx"], flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
