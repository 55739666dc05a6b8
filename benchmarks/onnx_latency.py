"""ONNX in onnxruntime (CPU) vs PyTorch eager (CPU): latency of a prefill and of one decode step with the KV
cache, for an unpruned and a pruned model, measured side by side in one run.

    python benchmarks/onnx_latency.py --model ../shared/models/qwen3moe-bench --ratio 0.5

Each variant is exported with ``moe_fx.deliver.onnx.export.export_onnx`` (parity checked there), then timed in
the same process: PyTorch with the ``grouped_mm`` and ``batched_mm`` experts, onnxruntime with the exported
graph (``batched_mm``, all threads), in rounds that alternate the variants. Prints a table and writes JSON.
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
from moe_fx.deliver.onnx.export import export_onnx
from moe_fx.deliver.onnx.runtime import OnnxCausalLM
from moe_fx.evaluate.nll import model_size
from moe_fx.evaluate.table import format_table, human_bytes
from moe_fx.formats.loading import load_model
from moe_fx.kernels.implementation import experts_implementation
from moe_fx.passes import DropExperts, Score


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


@torch.no_grad()
def _torch_latency(model, ids: torch.Tensor, impl: str, repeats: int) -> tuple[float, float]:
    with experts_implementation(model, impl):
        prefill = _median_ms(lambda: model(input_ids=ids, use_cache=True), repeats)
        past = model(input_ids=ids, use_cache=True).past_key_values
        step = ids[:, -1:]

        def decode():  # every timed step starts from the same past: the new token is cropped off again
            model(input_ids=step, past_key_values=past, use_cache=True)
            past.crop(-1)

        return prefill, _median_ms(decode, repeats)


def _ort_latency(runner: OnnxCausalLM, ids: np.ndarray, repeats: int) -> tuple[float, float]:
    batch, length = ids.shape
    empty = runner.empty_past(batch)
    prefill = _median_ms(lambda: runner.forward(ids, np.ones((batch, length), np.int64), empty), repeats)
    _, past = runner.forward(ids, np.ones((batch, length), np.int64), empty)
    step = ids[:, -1:]
    decode = _median_ms(lambda: runner.forward(step, np.ones((batch, length + 1), np.int64), past), repeats)
    return prefill, decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--ratio", type=float, default=0.5, help="fraction of experts dropped in the pruned variant")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (median)")
    ap.add_argument("--rounds", type=int, default=3, help="measurements per variant, alternating the variants (median)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default="benchmarks/results/onnx_latency.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    base = load_model(args.model, dtype="float32")
    variants = {"unpruned": base, f"experts-{args.ratio:.0%}": compose(Score("random"), DropExperts(ratio=args.ratio))(copy.deepcopy(base))}
    vocab = base.get_output_embeddings().weight.shape[0]
    ids = torch.randint(3, vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    runtimes = ("torch grouped_mm", "torch batched_mm", "onnxruntime")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        runners = {}
        for name, model in variants.items():
            export = export_onnx(model, Path(tmp) / name)
            runners[name] = OnnxCausalLM(export.path, device="cpu")
            results[name] = {"weight_bytes": model_size(model)["bytes"], "onnx_bytes": export.onnx_bytes,
                             "parity": export.parity.to_dict(), "rounds": {r: [] for r in runtimes}}
        # rounds alternate the variants, so drift of a shared machine (other jobs, clocks) hits both alike
        for _ in range(args.rounds):
            for name, model in variants.items():
                rounds = results[name]["rounds"]
                for impl in ("grouped_mm", "batched_mm"):
                    rounds[f"torch {impl}"].append(_torch_latency(model, ids, impl, args.repeats))
                rounds["onnxruntime"].append(_ort_latency(runners[name], ids.numpy(), args.repeats))
    rows = []
    for name, entry in results.items():
        entry["ms"] = {r: [statistics.median(t[i] for t in entry["rounds"][r]) for i in (0, 1)] for r in runtimes}
        for runtime, (prefill, decode) in entry["ms"].items():
            rows.append([name, runtime, human_bytes(entry["weight_bytes"]), f"{prefill:.1f}", f"{decode:.2f}"])
    header = f"batch {args.batch}, prompt {args.prompt} tokens, {args.threads} CPU threads, fp32; median of {args.rounds} alternating rounds of {args.repeats}"
    print(format_table(["variant", "runtime", "weights", "prefill ms", "decode step ms"], rows, title=header))
    meta = {"model": args.model, "rounds": args.rounds, "repeats": args.repeats, "batch": args.batch, "prompt": args.prompt, "threads": args.threads,
            "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
