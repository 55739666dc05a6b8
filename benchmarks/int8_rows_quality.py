"""What the grouped kernel's int8 rows add to int4 experts' NLL, measured on a CPU with the kernel's arithmetic
emulated: any model, no GPU.

On CUDA, ``int4-group`` experts multiply rows quantized to int8, one scale per row and 128 inputs (``QUANT`` 4 of
``moe_fx.kernels.triton_kernels``). Its products are exact in int32 and scaled once per tile, so the kernel equals
the dequantized rows times the dequantized weights up to float summation order. This runs that product on the
CPU through the path the GPU takes (rows sorted by expert, one matmul per expert), once with the rows' rounding
(``int8 rows``) and once without (``weight-only``), for the model and its REAP-pruned variants, on the valid
windows. It checks that the weight-only emulation gives the CPU reference path's NLL.

    python benchmarks/int8_rows_quality.py --model ../shared/models/qwen3moe-bench \\
        --calib ../shared/data/corpus/train.jsonl.gz --valid ../shared/data/corpus/valid.jsonl.gz --ratios 0.5
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch
from common import data_parser, quality_run

from moe_fx import compose
from moe_fx.evaluate.nll import evaluate_nll
from moe_fx.evaluate.table import format_table
from moe_fx.kernels import quantized_ops
from moe_fx.kernels.quantized import QuantizedWeight
from moe_fx.passes import Calibrate, DropExperts, Score
from moe_fx.rewrite.quantize_experts import quantize_experts_

SCHEME = "int4-group"
ACT_GROUP = 128
"""Inputs per row scale (``triton_kernels.ACT_GROUP``, not imported: that module needs Triton)."""


def int8_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded as ``quantize_rows`` rounds it for int8 codes (``max|x| / 127`` per row and 128 inputs, round
    half away from zero), dequantized."""
    rows, k = x.shape
    groups = -(-k // ACT_GROUP)
    padded = torch.nn.functional.pad(x.float(), (0, groups * ACT_GROUP - k)).view(rows, groups, ACT_GROUP)
    scale = padded.abs().amax(-1, keepdim=True) / 127
    q = padded / torch.where(scale > 0, scale, 1.0)
    codes = (torch.sign(q) * torch.floor(q.abs() + 0.5)).clamp(-127, 127)
    return (codes * scale).view(rows, -1)[:, :k].to(x.dtype)


def emulated_grouped(rounding: bool):
    """``quantized_ops.grouped`` on the CPU: each expert's sorted rows (``int8_rows`` of them with ``rounding``) times
    its dequantized weight, in float32."""

    def grouped(x: torch.Tensor, weight: QuantizedWeight, offsets: torch.Tensor, src: torch.Tensor | None = None) -> torch.Tensor:
        rows = (x if src is None else x[src]).float()
        rows = int8_rows(rows) if rounding else rows
        out = rows.new_empty(rows.shape[0], weight.codes.shape[1])
        start = 0
        for e, end in enumerate(offsets.tolist()):
            if end > start:
                w = weight.gather(torch.tensor([e]), torch.float32)[0]
                out[start:end] = rows[start:end] @ (w if weight.transposed else w.T)
            start = end
        return out.to(x.dtype)

    return grouped


@contextlib.contextmanager
def gpu_path(rounding: bool) -> Iterator[None]:
    """The moe_fx forward's CUDA path for quantized experts, its kernel emulated (``emulated_grouped``)."""
    with mock.patch.object(quantized_ops, "runs", lambda weight: not torch.is_grad_enabled()), \
            mock.patch.object(quantized_ops, "grouped", emulated_grouped(rounding)):
        yield


def main() -> None:
    ap = data_parser(__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/quantize/int8_rows_quality.json")
    args = ap.parse_args()
    run = quality_run(args)

    def nll(model) -> float:
        with torch.no_grad():
            return evaluate_nll(model, run.eval_set, batch_size=args.batch_size, show_progress=False)["mean"]["nll"]

    variants = {"unpruned": run.base}
    for ratio in args.ratios:
        passes = [Calibrate(run.tokens, batch_size=args.batch_size, show_progress=False), Score("reap"), DropExperts(ratio=ratio)]
        variants[f"reap-{ratio:.0%}"] = compose(*passes)(copy.deepcopy(run.base))
    results, table = {}, []
    for name, model in variants.items():
        dense = nll(model)
        quantized = copy.deepcopy(model)
        quantize_experts_(quantized, SCHEME)
        reference = nll(quantized)  # the CPU reference path: the routed experts dequantized
        with gpu_path(rounding=False):
            weight_only = nll(quantized)
        if abs(weight_only - reference) > 1e-4:
            raise SystemExit(f"{name}: the emulated path without rounding gives NLL {weight_only:.5f}, the reference {reference:.5f}")
        with gpu_path(rounding=True):
            rounded = nll(quantized)
        results[name] = {"nll": dense, "reference": reference, "weight_only": weight_only, "int8_rows": rounded}
        table.append([name, f"{dense:.4f}", f"{reference - dense:+.4f}", f"{weight_only - dense:+.4f}", f"{rounded - dense:+.4f}",
                      f"{rounded - weight_only:+.4f}"])
        print(format_table(["model", "NLL", f"{SCHEME} reference", "weight-only (emulated)", "int8 rows (emulated)", "int8 rows add"], table), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "scheme": SCHEME, "dtype": args.dtype, "results": results}, indent=1))


if __name__ == "__main__":
    main()
