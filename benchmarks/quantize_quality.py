"""Prune, then quantize: held-out NLL, generation agreement and bytes of quantized experts, after pruning and
alone, on the same valid windows.

    python benchmarks/quantize_quality.py --model ../shared/models/qwen3moe-bench \\
        --calib ../shared/data/corpus/train.jsonl.gz --valid ../shared/data/corpus/valid.jsonl.gz --ratios 0.25 0.5

Each variant (unpruned, REAP at each ratio) is saved in bfloat16 (the size a user downloads), then written with
each scheme by ``quantize_checkpoint`` (``fp8-block``: the hub's FP8 format; ``int8-channel`` / ``int4-group``:
compressed-tensors' format), and every checkpoint is loaded back through stock ``from_pretrained`` in bfloat16
(which dequantizes where it has no kernel for the format, as on a CPU). Bytes are measured on disk.

Generation agreement (greedy continuations of valid prompts, ``moe_fx.evaluate.generation``) is measured
against the unpruned bf16 model and against the same variant unquantized ("quantize alone"). On CUDA, each
checkpoint is also evaluated with its experts kept quantized and run by the moe_fx kernels (``kernels``), with
8-bit activations in the grouped kernel (the default there) and weight-only. Prints a table and writes JSON.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import torch
from common import data_parser, quality_run
from deploy_speed import log

from moe_fx import compose
from moe_fx.evaluate.generation import agreement, generation_prompts, reference
from moe_fx.evaluate.nll import disk_size, evaluate_nll
from moe_fx.evaluate.table import format_table, human_bytes
from moe_fx.formats import save_checkpoint
from moe_fx.formats.loading import load_model
from moe_fx.formats.quantized_checkpoint import SCHEMES, TARGETS, quantize_checkpoint
from moe_fx.passes import Calibrate, DropExperts, Score


def main() -> None:
    ap = data_parser(__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32, help="valid prompts of the generation agreement")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--targets", nargs="+", default=["experts"], choices=TARGETS,
                    help="what each scheme quantizes (quantize_checkpoint's targets); several: one checkpoint each")
    ap.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    ap.add_argument("--out", default="benchmarks/results/quantize_quality.json")
    args = ap.parse_args()
    run = quality_run(args)
    prompts = generation_prompts(run.eval_set, prompts=args.prompts, prompt_len=64)

    def nll(model) -> float:
        return evaluate_nll(model, run.eval_set, batch_size=args.batch_size, show_progress=False)["mean"]["nll"]

    variants = {"unpruned": run.base}
    for ratio in args.ratios:
        passes = [Calibrate(run.tokens, batch_size=args.batch_size, show_progress=False), Score("reap"), DropExperts(ratio=ratio)]
        variants[f"reap-{ratio:.0%}"] = compose(*passes)(copy.deepcopy(run.base))
    rows, results = [], {}
    base_nll = base_ref = source_bytes = None
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in variants.items():
            plain = save_checkpoint(copy.deepcopy(model).to(torch.bfloat16), Path(tmp) / name, report=False)
            bf16 = load_model(plain, dtype="bfloat16", device=args.device)
            own_ref = reference(bf16, prompts, args.new_tokens, batch_size=args.batch_size)
            base_ref = base_ref or own_ref
            result = {"nll": nll(bf16), "nll_float32": nll(model), "bytes_bf16": disk_size(plain),
                      "vs_unpruned": agreement(bf16, base_ref, batch_size=args.batch_size), "schemes": {}}
            source_bytes = source_bytes or result["bytes_bf16"]
            base_nll = result["nll"] if base_nll is None else base_nll
            rows.append(_row(name, result["nll"], base_nll, None, result["bytes_bf16"], source_bytes, result["vs_unpruned"], None))
            for scheme, targets in ((s, t) for s in args.schemes for t in args.targets):
                label = scheme if targets == "experts" else f"{scheme} ({targets})"
                stored = Path(tmp) / f"{name}-{scheme}-{targets}"
                entry = quantize_checkpoint(plain, stored, scheme=scheme, targets=targets)
                qmodel = load_model(stored, dtype="bfloat16", device=args.device, quantize=None)
                q = {"nll": nll(qmodel), "bytes": disk_size(stored), "quantization": entry,
                     "vs_unpruned": agreement(qmodel, base_ref, batch_size=args.batch_size),
                     "vs_unquantized": agreement(qmodel, own_ref, batch_size=args.batch_size)}
                q["added_nll"] = q["nll"] - result["nll"]
                if args.device.startswith("cuda"):
                    q["kernels"] = _kernel_nll(stored, nll, args.device)
                    q["kernels"]["added_nll"] = {k: v - result["nll"] for k, v in q["kernels"].items()}
                    log(f"{name} + {label}: moe_fx kernels NLL {q['kernels']}")
                result["schemes"][label] = q
                rows.append(_row(f"{name} + {label}", q["nll"], base_nll, result["nll"], q["bytes"], source_bytes, q["vs_unpruned"], q["vs_unquantized"]))
                del qmodel
            results[name] = result
    print(format_table(["model", "mean NLL", "vs unpruned", "added by quantizing", "on disk", "x bf16 source", "greedy tokens = unpruned",
                        "= unquantized"], rows,
                       title=f"{args.model}: REAP then quantized expert checkpoints, bfloat16 (valid, {args.eval_seqs} windows/domain x {args.seq_len}; "
                             f"{args.prompts} prompts x {args.new_tokens} greedy tokens)"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "calib_tokens": args.calib_tokens, "results": results}, indent=2) + "\n")


def _kernel_nll(stored: Path, nll, device: str) -> dict:
    """The checkpoint's NLL with its experts kept quantized in memory and run by the moe_fx kernels, as the grouped
    kernel runs by default (``activations``: 8-bit activations where the GPU has tensor cores for the codes) and
    weight-only (``MOE_FX_QUANTIZED_ACTIVATIONS=weight-only``)."""
    out = {}
    for label, setting in (("default", "auto"), ("weight_only", "weight-only")):
        os.environ["MOE_FX_QUANTIZED_ACTIVATIONS"] = setting
        try:
            with torch.no_grad():
                out[label] = nll(load_model(stored, dtype="bfloat16", device=device))
        finally:
            os.environ.pop("MOE_FX_QUANTIZED_ACTIVATIONS")
    return out


def _row(label: str, value: float, base: float, unquantized: float | None, size: int, source: int, vs_base: dict, vs_own: dict | None) -> list[str]:
    """A table row; ``unquantized`` (the same variant's NLL before quantizing) and ``vs_own`` are ``None`` for
    an unquantized variant."""
    return [label, f"{value:.4f}", f"{value - base:+.4f}", "" if unquantized is None else f"{value - unquantized:+.4f}", human_bytes(size),
            f"{size / source:.3f}", f"{vs_base['token_match']:.3f}", "" if vs_own is None else f"{vs_own['token_match']:.3f}"]


if __name__ == "__main__":
    main()
