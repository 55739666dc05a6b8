"""What int4 weights in the ONNX export cost in quality: held-out NLL of each export, run by onnxruntime, beside the
float export and PyTorch on the same valid windows.

    python benchmarks/onnx_int4_quality.py --model ../shared/models/qwen3moe-bench \\
        --valid ../shared/data/corpus/valid.jsonl.gz --out benchmarks/results/onnx_int4_quality.json

Each export (``--exports``, labels of ``onnx_latency.py``: float experts, int4 experts as ``QMoE``, int4 dense
layers as ``MatMulNBits``, both) is written without a past (logits of whole windows), checked there against the
model with the same dequantized weights, then run by ``OnnxCausalLM`` on onnxruntime's CPU kernels over the valid
windows. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from onnx_latency import EXPORTS, export_options

from moe_fx.deliver.onnx.export import export_onnx
from moe_fx.deliver.onnx.runtime import OnnxCausalLM
from moe_fx.evaluate.nll import build_eval_set, next_token_nll, nll_sum
from moe_fx.evaluate.table import format_table, human_bytes
from moe_fx.formats.loading import load_model, load_tokenizer


def onnx_nll(runner: OnnxCausalLM, windows: torch.Tensor, batch_size: int) -> tuple[float, int]:
    """Summed next-token NLL of the graph over ``windows`` ``[N, L]`` and the tokens predicted."""
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i : i + batch_size].numpy()
        logits, _ = runner.forward(batch, np.ones_like(batch), None)
        targets = torch.from_numpy(batch[:, 1:])
        total += float(next_token_nll(torch.from_numpy(logits[:, :-1]), targets))
        count += targets.numel()
    return total, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--valid", required=True, help="valid-split text")
    ap.add_argument("--exports", nargs="+", default=["fused", "fused-int4", "fused-dense-int4", "fused-int4-dense-int4"],
                    choices=[label for label, options in EXPORTS.items() if not options.get("static")])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-seqs", type=int, default=4, help="valid windows per domain")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/onnx_int4_quality.json")
    args = ap.parse_args()
    torch.manual_seed(0)

    model = load_model(args.model, dtype="float32", device="cpu")
    eval_set = build_eval_set(args.valid, load_tokenizer(args.model), seq_len=args.seq_len, seqs_per_domain=args.eval_seqs)
    windows = torch.cat(list(eval_set.windows.values()))
    total, count = nll_sum(model, windows, batch_size=args.batch_size)
    rows = {"torch float32": {"nll": total / count, "tokens": count}}
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.exports:
            export = export_onnx(model, Path(tmp) / label, with_past=False, **export_options(label, "cpu"))
            total, count = onnx_nll(OnnxCausalLM(export.path, device="cpu"), windows, args.batch_size)
            quantization = export.quantization.to_dict() if export.quantization else None
            rows[f"onnx {label}"] = {"nll": total / count, "tokens": count, "onnx_bytes": export.onnx_bytes,
                                     "parity_vs_dequantized": export.parity.max_abs_logit_diff, "vs_float_model": quantization}
    base = rows["torch float32"]["nll"]
    table = [[name, human_bytes(r["onnx_bytes"]) if "onnx_bytes" in r else "-", f"{r['nll']:.4f}", f"{math.exp(r['nll']):.3f}",
              f"{r['nll'] - base:+.4f}"] for name, r in rows.items()]
    print(format_table(["model", "files", "valid NLL", "ppl", "NLL vs float"], table,
                       title=f"{args.model}: {count} valid tokens ({len(eval_set.windows)} domains x {args.eval_seqs} windows of {args.seq_len})"))
    meta = {"model": args.model, "valid": args.valid, "seq_len": args.seq_len, "eval_seqs": args.eval_seqs, "domains": sorted(eval_set.windows)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
