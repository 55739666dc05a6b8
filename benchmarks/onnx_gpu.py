"""onnxruntime-gpu (CUDA provider) against PyTorch ``moe_fx`` with CUDA graphs, on random-weight models with
Qwen3-30B-A3B layer shapes: unpruned and 50% of the experts dropped, the fused ONNX MoE export (float16 and
int4 ``QMoE``) and today's plain-op export.

Dynamic exports (Optimum's layout) in two phases, so that each fits one device call; the model is rebuilt from
the same seed in both:

    python benchmarks/onnx_gpu.py --phase export --layers 4 --dir .device/onnx_gpu   # exports, parity on CUDA
    python benchmarks/onnx_gpu.py --phase time --layers 4 --dir .device/onnx_gpu     # every row in one process

Static decode graphs (``--static-cache``: one token a step, fixed batch and cache length, no shape computations),
exported, checked on CUDA, timed and deleted one at a time, next to PyTorch in the same process:

    python benchmarks/onnx_gpu.py --phase static --variants unpruned --static fused:1 fused:16 fused-int4:1

They run through :class:`moe_fx.deliver.onnx.OnnxDecoder` (the cache in place on the GPU) with and without
onnxruntime's CUDA graphs, over a cache of the same length as PyTorch's static cache (prompt + steps + 8).

Timed per export and batch: a prefill (batch x prompt, empty past) and a decode step at past length ``prompt``,
through onnxruntime's IO binding (inputs, past and outputs stay on the GPU), with and without onnxruntime's
CUDA graphs (a decode step of fixed shapes into preallocated outputs), and plain ``session.run`` with host
arrays. PyTorch: ``moe_fx`` experts, eager prefill, decode compiled with CUDA graphs (``reduce-overhead``)
over a static cache. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from common import print_profile
from decode import attempt, decode_ms, forward_for
from deploy_speed import build_synthetic, free, make_variant, random_ids, sync
from onnx_latency import EXPORTS, export_options, median_ms

from moe_fx.deliver.onnx import OnnxDecoder, StaticShape
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


def export_checked(model, path: Path, options: dict) -> tuple[object, str | None]:
    """Export with the parity check on; a graph that misses it is recorded and exported again unchecked (still timed)."""
    try:
        return export_onnx(model, path, **options), None
    except OnnxParityError as exc:
        return export_onnx(model, path, **dict(options, check=False)), str(exc)


def static_cache_len(args) -> int:
    """PyTorch's decode rows use a static cache of this length (``decode.decode_ms``); the static graphs the same."""
    return args.prompt + args.steps + 8


def run_steps(decoder: OnnxDecoder, tokens: np.ndarray, args) -> None:
    """``steps`` one-token steps from slot ``prompt``, waiting for the GPU at the end."""
    decoder.length = args.prompt
    for column in range(args.steps):
        decoder.step(tokens[:, column])
    decoder.synchronize()


def decoder_ms(decoder: OnnxDecoder, tokens: np.ndarray, args) -> float:
    """Median milliseconds per step over ``repeats`` runs of ``steps`` one-token steps from slot ``prompt`` (the
    first run captures the CUDA graph); every step writes its small inputs and waits for the GPU."""
    times = []
    for _ in range(args.repeats + 1):
        start = time.perf_counter()
        run_steps(decoder, tokens, args)
        times.append((time.perf_counter() - start) / args.steps * 1000)
    return float(np.median(times[1:]))


def timed_decoder(path: Path, tokens: np.ndarray, args, cuda_graph: bool, greedy: dict) -> float:
    """:func:`decoder_ms` of one session; then its greedy tokens from an 8-token prompt go in ``greedy[cuda_graph]``
    (the replayed graph must generate what plain runs of the same binding do)."""
    decoder = OnnxDecoder(path, device=args.device, cuda_graph=cuda_graph)
    ms = decoder_ms(decoder, tokens, args)
    greedy[cuda_graph] = decoder.generate(tokens[:, :8], 8)
    return ms


def profile_decoder(path: Path, tokens: np.ndarray, args, title: str) -> None:
    """onnxruntime's kernels in ``steps`` replayed decode steps, under torch.profiler (CUPTI sees every CUDA kernel
    of the process, onnxruntime's too): where a step's time goes, for the gap to PyTorch."""
    decoder = OnnxDecoder(path, device=args.device, cuda_graph=True)
    decoder_ms(decoder, tokens, args)  # captures the graph and warms up
    print_profile(f"{title}: onnxruntime, CUDA graph ({args.steps} steps)", lambda: run_steps(decoder, tokens, args), args.device, rows=30)


def static_phase(args, out: Path) -> dict:
    """Per variant: PyTorch's rows, then each static export (``label:batch``) exported, checked on CUDA, timed
    with and without onnxruntime's CUDA graphs, and deleted; the JSON is rewritten after every row."""
    rows = {}
    for name, model in _models(args):
        rows[torch_row(name, args)] = torch_rows(model, args)
        _write(out, args, rows)
        for spec in args.static:
            label, batch = spec.split(":")
            path = Path(args.dir) / name / f"{label}-b{batch}"
            options = dict(export_options(label, args.device), dtype=args.dtype, device=args.device, overwrite=True,
                           static=StaticShape(int(batch), static_cache_len(args)))
            start = time.perf_counter()
            result, failed = export_checked(model, path, options)
            entry = {"export_seconds": round(time.perf_counter() - start, 1), "onnx_bytes": result.onnx_bytes, "parity_failure": failed,
                     "parity": result.parity.to_dict() if result.parity else None,
                     "quantization": result.quantization.to_dict() if result.quantization else None}
            tokens = random_ids((int(batch), args.steps), model.config.vocab_size, 2000 + int(batch), "cpu").numpy()
            greedy = {}
            for graphs in (True, False):
                key = "decode_cuda_graph_ms" if graphs else "decode_ms"
                entry[key] = attempt(lambda: timed_decoder(path, tokens, args, graphs, greedy))
                free(args.device)
            entry["cuda_graph_greedy_identical"] = bool((greedy[True] == greedy[False]).all()) if len(greedy) == 2 else None
            if args.profile:
                attempt(lambda: profile_decoder(path, tokens, args, f"{name}/{label} b{batch}"))
                free(args.device)
            rows.setdefault(f"{name}/onnx {label} static", {})[f"b{batch}"] = entry
            print(name, label, batch, entry, flush=True)
            _write(out, args, rows)
            shutil.rmtree(path)
        del model
        free(args.device)
    return rows


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


def torch_row(variant: str, args) -> str:
    return f"{variant}/torch moe_fx {'cuda-graphs' if args.device == 'cuda' else 'eager'}"


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
        rows[torch_row(name, args)] = torch_rows(model, args)
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
    ap.add_argument("--phase", choices=("export", "time", "static"), required=True)
    ap.add_argument("--dir", default=".device/onnx_gpu", help="where the exports are written and read")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU-free smoke test of the script)")
    ap.add_argument("--exports", nargs="+", default=["unfused", "fused", "fused-int4"], choices=list(EXPORTS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--static", nargs="+", default=["fused:1", "fused:16", "fused-int4:1"], metavar="EXPORT:BATCH",
                    help="--phase static: the static decode graphs to export and time (an export label and its batch)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16, help="decode steps per timed PyTorch run")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", help="cuda; cpu only smoke-tests the script (with --tiny --dtype float32)")
    ap.add_argument("--dtype", default="float16", choices=list(DTYPES))
    ap.add_argument("--out", default="benchmarks/results/onnx_gpu.json")
    ap.add_argument("--profile", action="store_true", help="static phase: each graph's replayed steps under torch.profiler (top kernels)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.phase == "static":
        result = static_phase(args, out)
    else:
        result = export_phase(args) if args.phase == "export" else time_phase(args)
    _write(out, args, result)
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
    if args.phase == "static":
        print(static_table(result, args))


def _ms(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "failed"


def static_table(result: dict, args) -> str:
    """Decode ms per step of each static graph with and without CUDA graphs, and PyTorch's over onnxruntime's."""
    table = []
    for row, per_batch in result.items():
        variant = row.split("/")[0]
        reference_row = result.get(torch_row(variant, args), {})
        for batch, t in per_batch.items():
            reference = reference_row.get(batch, {}).get("decode_ms")
            graph = t.get("decode_cuda_graph_ms", t.get("decode_ms"))
            ratio = f"{reference / graph:.2f}" if isinstance(graph, float) and reference else "-"
            table.append([row, batch, _ms(t.get("decode_ms")), _ms(t["decode_cuda_graph_ms"]) if "decode_cuda_graph_ms" in t else "-", ratio])
    return format_table(["variant / runtime", "batch", "decode ms", "decode ms (CUDA graph)", "PyTorch ms / this"], table,
                        title=f"static decode graphs, {args.layers} layers, {'tiny' if args.tiny else 'Qwen3-30B-A3B'} shapes, {args.dtype}, "
                              f"cache {static_cache_len(args)}")


def _write(out: Path, args, result: dict) -> None:
    """The JSON with the run's settings and versions (rewritten as rows arrive, so a cut-off run keeps its rows)."""
    import onnxruntime

    meta = {"phase": args.phase, "layers": args.layers, "batches": args.batches, "prompt": args.prompt, "steps": args.steps,
            "dtype": args.dtype, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "providers": onnxruntime.get_available_providers()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": result}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
