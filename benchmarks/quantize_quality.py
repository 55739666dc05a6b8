"""Prune, then quantize: held-out NLL and bytes on disk of block-wise FP8 experts (``moe_fx.formats.fp8_block``),
after pruning, and of quantizing alone, on the same valid windows.

    python benchmarks/quantize_quality.py --model ../shared/models/qwen3moe-bench \\
        --calib ../shared/data/corpus/train.jsonl.gz --valid ../shared/data/corpus/valid.jsonl.gz --ratios 0.5

Each checkpoint is saved in bfloat16 (the size a user downloads), quantized with ``quantize_checkpoint`` and
loaded back through stock ``from_pretrained`` (which dequantizes FP8 where it has no FP8 kernel, as on a CPU),
then evaluated in float32 like the unquantized ones. Prints a table and writes JSON.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import torch
from common import data_parser, quality_run

from moe_fx import compose
from moe_fx.evaluate.nll import disk_size, evaluate_nll
from moe_fx.evaluate.table import format_table, human_bytes
from moe_fx.formats import save_checkpoint
from moe_fx.formats.fp8_block import quantize_checkpoint
from moe_fx.formats.loading import load_model
from moe_fx.passes import Calibrate, DropExperts, Score


def main() -> None:
    ap = data_parser(__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/quantize_quality.json")
    args = ap.parse_args()
    run = quality_run(args)

    def nll(model) -> float:
        return evaluate_nll(model, run.eval_set, batch_size=args.batch_size, show_progress=False)["mean"]["nll"]

    variants = {"unpruned": run.base}
    for ratio in args.ratios:
        passes = [Calibrate(run.tokens, batch_size=args.batch_size, show_progress=False), Score("reap"), DropExperts(ratio=ratio)]
        variants[f"reap-{ratio:.0%}"] = compose(*passes)(copy.deepcopy(run.base))
    rows, results = [], {}
    base_nll = None
    with tempfile.TemporaryDirectory() as tmp:
        source_bytes = None
        for name, model in variants.items():
            plain = save_checkpoint(copy.deepcopy(model).to(torch.bfloat16), Path(tmp) / name, report=False)
            fp8 = Path(tmp) / f"{name}-fp8"
            entry = quantize_checkpoint(plain, fp8)
            # both checkpoints as users load them, in bfloat16 (transformers dequantizes FP8 to bfloat16 where it has
            # no FP8 kernels), so that "fp8 adds" is the quantization alone
            bf16 = load_model(plain, dtype="bfloat16", device=args.device)
            quantized = load_model(fp8, dtype="bfloat16", device=args.device)
            result = {"nll": nll(bf16), "nll_fp8": nll(quantized), "nll_float32": nll(model), "bytes_bf16": disk_size(plain),
                      "bytes_fp8": disk_size(fp8), "quantization": entry}
            source_bytes = source_bytes or result["bytes_bf16"]
            base_nll = result["nll"] if base_nll is None else base_nll
            results[name] = result
            for label, value, size in ((name, result["nll"], result["bytes_bf16"]), (f"{name} + fp8-block", result["nll_fp8"], result["bytes_fp8"])):
                rows.append([label, f"{value:.4f}", f"{value - base_nll:+.4f}", human_bytes(size), f"{size / source_bytes:.3f}"])
            result["fp8_added_nll"] = result["nll_fp8"] - result["nll"]
    print(format_table(["checkpoint", "mean NLL", "vs unpruned", "on disk", "x bf16 source"], rows,
                       title=f"{args.model}: REAP then fp8-block experts, bfloat16 (valid, {args.eval_seqs} windows/domain x {args.seq_len})"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "calib_tokens": args.calib_tokens, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
