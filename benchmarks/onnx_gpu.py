"""onnxruntime-gpu (CUDA provider) against PyTorch ``moe_fx`` with CUDA graphs, on random-weight models with
Qwen3-30B-A3B layer shapes: unpruned and 50% of the experts dropped, the fused ONNX MoE export (float16 and
int4 ``QMoE``) and today's plain-op export.

Two phases, so that each fits one device call; the model is rebuilt from the same seed in both:

    python benchmarks/onnx_gpu.py --phase export --layers 4 --dir .device/onnx_gpu   # exports, parity on CUDA
    python benchmarks/onnx_gpu.py --phase time --layers 4 --dir .device/onnx_gpu     # every row in one process

Timed per export and batch: a prefill (batch x prompt, empty past) and a decode step at past length ``prompt``,
through onnxruntime's IO binding (inputs, past and outputs stay on the GPU), with and without onnxruntime's
CUDA graphs (a decode step of fixed shapes into preallocated outputs), and plain ``session.run`` with host
arrays. PyTorch: ``moe_fx`` experts, eager prefill, decode compiled with CUDA graphs (``reduce-overhead``)
over a static cache. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from decode import attempt, decode_ms, forward_for
from deploy_speed import build_synthetic, free, make_variant, random_ids, sync
from onnx_latency import EXPORTS, export_options, median_ms

from moe_fx.deliver.onnx.export import OnnxParityError, export_onnx
from moe_fx.deliver.onnx.runtime import ONNX_FILE
from moe_fx.evaluate.table import format_table, human_bytes

VARIANTS = {"unpruned": None, "experts-50%": "experts-50%"}
DTYPES = {"float16": torch.float16, "float32": torch.float32}


def _models(args):
    base = build_synthetic(args, DTYPES[args.dtype])
    for name in args.variants:
        yield name, base if VARIANTS[name] is None else make_variant(base, VARIANTS[name], args.seed)


def export_phase(args) -> dict:
    """Export every (variant, format) to ``args.dir`` with the parity check on the CUDA provider."""
    records = {}
    for name, model in _models(args):
        for label in args.exports:
            if label == "unfused" and name != "unpruned":
                continue  # today's export, for the unpruned model only: the reference the fused one must beat
            start = time.perf_counter()
            options = dict(export_options(label, args.device), dtype=args.dtype, device=args.device, overwrite=True)
            try:
                result, failed = export_onnx(model, Path(args.dir) / name / label, **options), None
            except OnnxParityError as exc:  # recorded; exported again unchecked so that it is still timed
                result, failed = export_onnx(model, Path(args.dir) / name / label, check=False, **options), str(exc)
            records[f"{name}/{label}"] = {**result.to_dict(), "parity_failure": failed, "seconds": round(time.perf_counter() - start, 1)}
            parity = failed or (f"parity {result.parity.max_abs_logit_diff:.3g} (largest logit {result.parity.logit_scale:.2f}), "
                                f"greedy identical {result.parity.greedy_identical}")
            print(f"{name}/{label}: {human_bytes(result.onnx_bytes)}, {parity}, fused {len(result.fused_blocks)}, "
                  f"{records[f'{name}/{label}']['seconds']} s", flush=True)
        free(args.device)
    return records


class OrtTimer:
    """One exported graph in an onnxruntime CUDA session, timed with host arrays or with IO binding."""

    def __init__(self, path: Path, device: str, dtype: str, cuda_graph: bool = False):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        provider = ("CUDAExecutionProvider", {"enable_cuda_graph": "1"} if cuda_graph else {}) if device == "cuda" else "CPUExecutionProvider"
        self.session = ort.InferenceSession(str(path / ONNX_FILE), options, providers=[provider])
        self.device, self.dtype = device, np.dtype(dtype)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.past = [n for n in self.inputs if n.startswith("past_key_values.")]

    def feeds(self, ids: np.ndarray, past_len: int) -> dict[str, np.ndarray]:
        batch, length = ids.shape
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((batch, past_len + length), np.int64),
                "position_ids": np.broadcast_to(np.arange(past_len, past_len + length), (batch, length)).astype(np.int64).copy()}
        rng = np.random.default_rng(0)
        for name in self.past:
            _, heads, _, head_dim = self.inputs[name].shape
            feed[name] = (rng.standard_normal((batch, heads, past_len, head_dim)) * 0.1).astype(self.dtype)
        return feed

    def host_ms(self, feed: dict, repeats: int) -> float:
        return median_ms(lambda: self.session.run(None, feed), repeats, warmup=2)

    def bound_ms(self, feed: dict, repeats: int, fixed_outputs: bool = False) -> float:
        """IO binding: inputs copied to the GPU once; outputs on the GPU (preallocated with ``fixed_outputs``, which
        CUDA graphs need)."""
        import onnxruntime as ort

        binding = self.session.io_binding()
        values = {k: ort.OrtValue.ortvalue_from_numpy(v, self.device, 0) for k, v in feed.items()}
        for k, v in values.items():
            binding.bind_ortvalue_input(k, v)
        batch, length = feed["input_ids"].shape
        total = feed["attention_mask"].shape[1]
        held = []
        for name in self.outputs:
            if not fixed_outputs:
                binding.bind_output(name, self.device)
                continue
            if name == "logits":
                shape = (batch, length, self.session.get_outputs()[0].shape[-1])
            else:
                _, heads, _, head_dim = self.inputs[name.replace("present.", "past_key_values.")].shape
                shape = (batch, heads, total, head_dim)
            value = ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, self.device, 0)
            held.append(value)
            binding.bind_ortvalue_output(name, value)

        def run():
            self.session.run_with_iobinding(binding)
            binding.synchronize_outputs()

        return median_ms(run, repeats, warmup=2)  # the second warm-up call captures the CUDA graph


@torch.no_grad()
def torch_rows(model, args) -> dict:
    """PyTorch moe_fx: eager prefill (with a cache) and CUDA-graph decode steps per batch."""
    out = {}
    for batch in args.batches:
        ids = random_ids((batch, args.prompt), model.config.vocab_size, batch, args.device)
        model.set_experts_implementation("moe_fx")

        def prefill():
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
            sync(args.device)

        forward = forward_for(model, "moe_fx", "cuda-graphs" if args.device == "cuda" else "eager")
        out[f"b{batch}"] = {"prefill_ms": median_ms(prefill, args.repeats, warmup=2), "decode_ms": decode_ms(model, forward, batch, args)}
        torch._dynamo.reset()
    return out


def time_phase(args) -> dict:
    rows = {}
    for name, model in _models(args):
        rows[f"{name}/torch moe_fx {'cuda-graphs' if args.device == 'cuda' else 'eager'}"] = torch_rows(model, args)
        del model
        free(args.device)
        for label in args.exports:
            path = Path(args.dir) / name / label
            if not (path / ONNX_FILE).is_file():
                continue
            entry = rows[f"{name}/onnx {label}"] = {}
            plain = OrtTimer(path, args.device, args.dtype)
            graphs = attempt(lambda: OrtTimer(path, args.device, args.dtype, cuda_graph=True)) if args.device == "cuda" else None
            for batch in args.batches:
                ids = random_ids((batch, args.prompt), 1000, batch, "cpu").numpy()
                prefill = plain.feeds(ids, 0)
                step = plain.feeds(ids[:, -1:], args.prompt)
                entry[f"b{batch}"] = {
                    "prefill_ms": plain.bound_ms(prefill, args.repeats),
                    "decode_ms": plain.bound_ms(step, args.repeats),
                    "decode_host_ms": plain.host_ms(step, args.repeats),
                    "decode_cuda_graph_ms": attempt(lambda: graphs.bound_ms(step, args.repeats, fixed_outputs=True)) if isinstance(graphs, OrtTimer) else graphs,
                }
                print(name, label, batch, entry[f"b{batch}"], flush=True)
            plain = graphs = None  # free both sessions' weights before the next export's
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", choices=("export", "time"), required=True)
    ap.add_argument("--dir", default=".device/onnx_gpu", help="where the exports are written and read")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU-free smoke test of the script)")
    ap.add_argument("--exports", nargs="+", default=["unfused", "fused", "fused-int4"], choices=list(EXPORTS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16, help="decode steps per timed PyTorch run")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", help="cuda; cpu only smoke-tests the script (with --tiny --dtype float32)")
    ap.add_argument("--dtype", default="float16", choices=list(DTYPES))
    ap.add_argument("--out", default="benchmarks/results/onnx_gpu.json")
    args = ap.parse_args()
    import onnxruntime

    result = export_phase(args) if args.phase == "export" else time_phase(args)
    meta = {"phase": args.phase, "layers": args.layers, "batches": args.batches, "prompt": args.prompt, "dtype": args.dtype,
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "providers": onnxruntime.get_available_providers()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": result}, indent=2, default=str) + "\n")
    if args.phase == "time":
        table = []
        for row, per_batch in result.items():
            for batch, t in per_batch.items():
                tok_s = int(batch[1:]) / (t["decode_ms"] / 1000)
                graph = t.get("decode_cuda_graph_ms")
                table.append([row, batch, f"{t['prefill_ms']:.1f}", f"{t['decode_ms']:.2f}", f"{t.get('decode_host_ms', float('nan')):.2f}",
                              f"{graph:.2f}" if isinstance(graph, float) else ("failed" if graph else "-"), f"{tok_s:.0f}"])
        print(format_table(["variant / runtime", "batch", "prefill ms", "decode ms (IO binding)", "decode ms (host arrays)",
                            "decode ms (ORT CUDA graph)", "tok/s (IO binding)"], table, title=f"{args.layers} layers, {'tiny' if args.tiny else 'Qwen3-30B-A3B'} shapes, {args.dtype}"))


if __name__ == "__main__":
    main()
