"""ONNX in onnxruntime vs PyTorch eager: latency of a prefill and of one decode step with the KV cache, for an
unpruned and a pruned model, at several batch sizes, measured side by side in one run.

    python benchmarks/onnx_latency.py --model ../shared/models/qwen3moe-bench --ratio 0.5 --batches 1 16

Each variant is exported with ``moe_fx.deliver.onnx.export.export_onnx`` once per expert format
(``--exports``: plain ops ``unfused``, onnxruntime's fused MoE node ``fused``, and its int8/int4 ``QMoE``; parity
checked there), then timed in the same process with PyTorch's ``moe_fx`` experts, in rounds that alternate
the variants. ``--device cuda`` runs onnxruntime's CUDA provider (onnxruntime-gpu) and PyTorch on the GPU.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moe_fx import compose
from moe_fx.deliver.onnx import OnnxDecoder, StaticShape
from moe_fx.deliver.onnx.export import export_onnx
from moe_fx.deliver.onnx.runtime import OnnxCausalLM
from moe_fx.evaluate.nll import model_size
from moe_fx.evaluate.table import format_table, human_bytes
from moe_fx.formats.loading import load_model
from moe_fx.kernels.implementation import experts_implementation
from moe_fx.passes import DropExperts, Score


def median_ms(fn, repeats: int, warmup: int = 1) -> float:
    """Median milliseconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _synced(fn, device: str):
    if device == "cpu":
        return fn

    def call():
        fn()
        torch.cuda.synchronize()

    return call


@torch.no_grad()
def _torch_latency(model, ids: torch.Tensor, impl: str, repeats: int) -> tuple[float, float]:
    device = str(ids.device)
    with experts_implementation(model, impl):
        prefill = median_ms(_synced(lambda: model(input_ids=ids, use_cache=True), device), repeats)
        past = model(input_ids=ids, use_cache=True).past_key_values
        step = ids[:, -1:]

        def decode():  # every timed step starts from the same past: the new token is cropped off again
            model(input_ids=step, past_key_values=past, use_cache=True)
            past.crop(-1)

        return prefill, median_ms(_synced(decode, device), repeats)


def _ort_latency(runner: OnnxCausalLM | OnnxDecoder, ids: np.ndarray, repeats: int) -> tuple[float | None, float]:
    batch, length = ids.shape
    if isinstance(runner, OnnxDecoder):  # a static graph: one-token steps from slot ``length`` (its prefill is not timed)

        def step():
            runner.length = length
            runner.step(ids[:, -1])
            runner.synchronize()

        return None, median_ms(step, repeats)
    empty = runner.empty_past(batch)
    prefill = median_ms(lambda: runner.forward(ids, np.ones((batch, length), np.int64), empty), repeats)
    _, past = runner.forward(ids, np.ones((batch, length), np.int64), empty)
    step = ids[:, -1:]
    decode = median_ms(lambda: runner.forward(step, np.ones((batch, length + 1), np.int64), past), repeats)
    return prefill, decode


def _median(values: list) -> float | None:
    """The median, or ``None`` for a measurement a runtime does not make (a static graph's prefill)."""
    return None if None in values else statistics.median(values)


def _static_runners(model, name: str, label: str, args, tmp: Path, runners: dict):
    """One static decode graph per batch (a cache of the prompt plus 8 slots), each in an ``OnnxDecoder``; returns the
    last export (its size and parity stand for all)."""
    for batch in args.batches:
        static = StaticShape(batch, args.prompt + 8)
        export = export_onnx(model, tmp / name / f"{label}-b{batch}", dtype=args.dtype, device=args.device, static=static,
                             **export_options(label, args.device))
        runners[name, label, batch] = OnnxDecoder(export.path, device="cuda" if args.device.startswith("cuda") else "cpu")
    return export


EXPORTS = {
    "unfused": {"moe_op": "unfused"},
    "fused": {"moe_op": "fused"},
    "fused-model-routing": {"moe_op": "fused", "operator_routing": False},
    "fused-int8": {"moe_op": "fused", "weights": "int8"},
    "fused-int4": {"moe_op": "fused", "weights": "int4"},
    "fused+ort-fusions": {"moe_op": "fused", "ort_fusions": True},
    "fused-int4+ort-fusions": {"moe_op": "fused", "weights": "int4", "ort_fusions": True},
    "fused-dense-int4": {"moe_op": "fused", "dense_weights": "int4"},
    "fused-int4-dense-int4": {"moe_op": "fused", "weights": "int4", "dense_weights": "int4"},
    "fused-static": {"moe_op": "fused", "static": True},
    "fused-opset23": {"moe_op": "fused", "opset": 23, "attention": "plain"},
    "fused-opset23-model-routing": {"moe_op": "fused", "opset": 23, "operator_routing": False, "attention": "plain"},
    "fused-gqa": {"moe_op": "fused", "attention": "gqa", "static": True},
    "fused-gqa+ort-fusions": {"moe_op": "fused", "attention": "gqa", "ort_fusions": True, "static": True},
    "fused-gqa-cuda+ort-fusions": {"moe_op": "fused", "attention": "gqa-cuda", "ort_fusions": True, "static": True},
    "fused-gqa-cuda-int4+ort-fusions": {"moe_op": "fused", "weights": "int4", "attention": "gqa-cuda", "ort_fusions": True,
                                        "static": True},
    "fused-gqa-cuda-int4-dense-int4+ort-fusions": {"moe_op": "fused", "weights": "int4", "dense_weights": "int4", "attention": "gqa-cuda",
                                                   "ort_fusions": True, "static": True},
}
"""The exports a benchmark can time: ``export_onnx`` options (``ort_fusions``: for the provider the run uses;
``static``: a static decode graph per batch, run by ``OnnxDecoder``: decode only; ``opset`` 23: attention as ONNX's
``Attention`` op on the grouped key/value heads; ``operator_routing`` off: the model's routing ops kept in the graph,
the side-by-side of the MoE node routing from the raw logits; ``attention``: a static graph's attention as
onnxruntime's ``GroupQueryAttention`` node (``gqa``; ``gqa-cuda``: the node also applies the per-head q/k norms, a
CUDA-only graph) or the model's ops (``plain``))."""


def export_options(label: str, device: str) -> dict:
    """``export_onnx`` keyword arguments of the export ``label`` for a run on ``device`` (a static label's shape is the
    caller's to add)."""
    options = dict(EXPORTS[label])
    options.pop("static", None)
    if options.pop("ort_fusions", False):
        options["ort_fusions"] = "cuda" if device.startswith("cuda") else "cpu"
    return options


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--ratio", type=float, default=0.5, help="fraction of experts dropped in the pruned variant")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--exports", nargs="+", default=["unfused", "fused", "fused-int8", "fused-int4"], choices=list(EXPORTS))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (onnxruntime-gpu's CUDA provider)")
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (median)")
    ap.add_argument("--rounds", type=int, default=3, help="measurements per variant, alternating the variants (median)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default="benchmarks/results/onnx_latency.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    base = load_model(args.model, dtype=args.dtype, device=args.device)
    variants = {"unpruned": base, f"experts-{args.ratio:.0%}": compose(Score("random"), DropExperts(ratio=args.ratio))(copy.deepcopy(base))}
    vocab = base.get_output_embeddings().weight.shape[0]
    runtimes = ["torch moe_fx", *(f"onnx {e}" for e in args.exports)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        runners = {}
        for name, model in variants.items():
            results[name] = {"weight_bytes": model_size(model)["bytes"], "exports": {},
                             "rounds": {f"b{b}": {r: [] for r in runtimes} for b in args.batches}}
            for label in args.exports:
                if EXPORTS[label].get("static"):
                    export = _static_runners(model, name, label, args, Path(tmp), runners)
                else:
                    export = export_onnx(model, Path(tmp) / name / label, dtype=args.dtype, device=args.device, **export_options(label, args.device))
                    runners[name, label] = OnnxCausalLM(export.path, device=args.device)
                results[name]["exports"][label] = {"onnx_bytes": export.onnx_bytes, "fused_blocks": len(export.fused_blocks),
                                                   "parity": export.parity.to_dict(),
                                                   "quantization": export.quantization.to_dict() if export.quantization else None}
        # rounds alternate the variants, so drift of a shared machine (other jobs, clocks) hits both alike
        for _ in range(args.rounds):
            for batch in args.batches:
                ids = torch.randint(3, vocab, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))
                for name, model in variants.items():
                    rounds = results[name]["rounds"][f"b{batch}"]
                    rounds["torch moe_fx"].append(_torch_latency(model, ids.to(args.device), "moe_fx", args.repeats))
                    for label in args.exports:
                        runner = runners.get((name, label, batch), runners.get((name, label)))
                        rounds[f"onnx {label}"].append(_ort_latency(runner, ids.numpy(), args.repeats))
    rows = []
    for batch in args.batches:
        for name, entry in results.items():
            ms = entry.setdefault("ms", {})[f"b{batch}"] = {
                r: [_median([t[i] for t in entry["rounds"][f"b{batch}"][r]]) for i in (0, 1)] for r in runtimes}
            for runtime, (prefill, decode) in ms.items():
                size = entry["exports"].get(runtime.removeprefix("onnx "), {}).get("onnx_bytes", entry["weight_bytes"])
                rows.append([batch, name, runtime, human_bytes(size), "-" if prefill is None else f"{prefill:.1f}", f"{decode:.2f}"])
    header = (f"prompt {args.prompt} tokens, {args.device} ({args.threads} CPU threads), {args.dtype}; "
              f"median of {args.rounds} alternating rounds of {args.repeats}")
    print(format_table(["batch", "variant", "runtime", "weights", "prefill ms", "decode step ms"], rows, title=header))
    meta = {"model": args.model, "rounds": args.rounds, "repeats": args.repeats, "batches": args.batches, "prompt": args.prompt,
            "threads": args.threads, "device": args.device, "dtype": args.dtype,
            "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
