"""Streaming vs in-memory pruning on a checkpoint with Qwen3-30B-A3B's layer shapes (issue 7).

    python benchmarks/streaming.py --make /tmp/q30b --layers 12        # write the random-weight checkpoint (bf16)
    python benchmarks/streaming.py --source /tmp/q30b --device cuda    # REAP 50% over 256 x 2048 tokens, both paths

Both paths run in this process one after the other on the same checkpoint and tokens: ``moe_fx.load`` +
``compose(Calibrate, Score("reap"), DropExperts(ratio=0.5))`` + ``save_checkpoint`` (in memory), and
``stream_prune`` with the same passes. Wall time covers reading the source to a finished output directory.
Reported: wall times and their ratio, peak GPU memory of each path (``torch.cuda.max_memory_allocated``),
one decoder layer's weights, the streamed hidden states, per-layer seconds (load / forward / passes / write),
whether the kept experts agree and the largest difference between the written tensors. Random weights: the
numbers are about time and memory, not quality (quality equality is tested on trained models in
tests/test_streaming.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

SHAPES = dict(  # Qwen3-30B-A3B
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
    num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128, norm_topk_prob=True,
    max_position_embeddings=4096, tie_word_embeddings=False, rope_theta=1e6,
)


def make(path: Path, layers: int, device: str) -> None:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(num_hidden_layers=layers, **SHAPES)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    print(f"wrote {path}: {sum(f.stat().st_size for f in path.glob('*.safetensors')) / 2**30:.2f} GiB")


def _passes(tokens, batch_size: int):
    from moe_fx.passes import Calibrate, DropExperts, Score

    return [Calibrate(tokens, batch_size=batch_size, show_progress=False), Score("reap"), DropExperts(ratio=0.5)]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def run(source: Path, work: Path, device: str, sequences: int, seq_len: int, batch_size: int) -> dict:
    from moe_fx import compose
    from moe_fx.formats import save_checkpoint
    from moe_fx.formats.loading import load_model
    from moe_fx.run.streaming import stream_prune

    tokens = torch.randint(0, SHAPES["vocab_size"], (sequences, seq_len), generator=torch.Generator().manual_seed(0))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    cuda = device.startswith("cuda")
    peak = torch.cuda.max_memory_allocated if cuda else (lambda: 0)
    reset = torch.cuda.reset_peak_memory_stats if cuda else (lambda: None)
    # warm-up (CUDA context, kernels, the source in the page cache) so no path pays it in the timings below
    stream_prune(source, work / "warmup", _passes(tokens[:batch_size], batch_size), device=device, dtype="bfloat16", show_progress=False)
    shutil.rmtree(work / "warmup")
    reset()
    t0 = time.perf_counter()
    model = load_model(source, dtype="bfloat16", device=device)
    loaded_s = time.perf_counter() - t0
    model = compose(*_passes(tokens, batch_size))(model)
    save_checkpoint(model, work / "in_memory", source=source)
    memory_s = time.perf_counter() - t0
    memory_peak = peak()
    del model

    streamed = {}
    for states in ("auto", "cpu"):  # hidden states on the GPU while small / always on the CPU
        shutil.rmtree(work / "streamed", ignore_errors=True)
        reset()
        t0 = time.perf_counter()
        report = stream_prune(source, work / "streamed", _passes(tokens, batch_size), device=device, dtype="bfloat16", states=states,
                              show_progress=True)
        streamed[states] = (report, time.perf_counter() - t0, peak())
    a, b = _tensors(work / "streamed"), _tensors(work / "in_memory")
    max_diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    rec = [json.loads((work / d / "moe_fx.json").read_text()) for d in ("streamed", "in_memory")]
    per_layer = rec[0]["streaming"]["per_layer_seconds"]
    report, stream_s, stream_peak = streamed["auto"]
    cpu_report, cpu_s, cpu_peak = streamed["cpu"]
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "layers": report.layers,
        "tokens": sequences * seq_len,
        "batch_size": batch_size,
        "stream_seconds": round(stream_s, 2),
        "in_memory_seconds": round(memory_s, 2),
        "in_memory_load_seconds": round(loaded_s, 2),
        "time_ratio": round(stream_s / memory_s, 3),
        "stream_peak_gpu_bytes": stream_peak,
        "in_memory_peak_gpu_bytes": memory_peak,
        "layer_weight_bytes": report.layer_weight_bytes,
        "stream_peak_over_layer": round(stream_peak / report.layer_weight_bytes, 3),
        "stream_peak_gpu_bytes_in_run": report.peak_gpu_bytes,
        "cpu_states_peak_gpu_bytes_in_run": cpu_report.peak_gpu_bytes,
        "cpu_states_seconds": round(cpu_s, 2),
        "cpu_states_time_ratio": round(cpu_s / memory_s, 3),
        "cpu_states_peak_gpu_bytes": cpu_peak,
        "cpu_states_peak_over_layer": round(cpu_peak / report.layer_weight_bytes, 3),
        "cpu_states_phase_seconds": {k: round(v, 2) for k, v in cpu_report.phase_seconds.items()},
        "hidden_state_bytes": report.hidden_state_bytes,
        "hidden_state_device": report.hidden_state_device,
        "stream_phase_seconds": {k: round(v, 2) for k, v in report.phase_seconds.items()},
        "peak_cpu_bytes": report.peak_cpu_bytes,
        "same_kept_experts": rec[0]["plan"] == rec[1]["plan"],
        "same_tensor_names": sorted(a) == sorted(b),
        "max_abs_tensor_diff": max_diff,
        "per_layer_seconds": per_layer,
    }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--make", type=Path, help="write the random-weight checkpoint here and exit")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--source", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/moe_fx_stream_bench"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sequences", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/streaming.json"))
    args = ap.parse_args()
    if args.make:
        make(args.make, args.layers, args.device)
        return
    result = run(args.source, args.work, args.device, args.sequences, args.seq_len, args.batch_size)
    gib = lambda b: f"{b / 2**30:.2f} GiB"
    rows = [
        ("layers / tokens", f"{result['layers']} / {result['tokens']:,}"),
        ("wall time streamed / in memory", f"{result['stream_seconds']} s / {result['in_memory_seconds']} s (ratio {result['time_ratio']})"),
        ("peak GPU streamed / in memory", f"{gib(result['stream_peak_gpu_bytes'])} / {gib(result['in_memory_peak_gpu_bytes'])}"),
        ("one decoder layer's weights", f"{gib(result['layer_weight_bytes'])} (streamed peak = {result['stream_peak_over_layer']}x)"),
        ("states on CPU: time (ratio) / peak GPU", f"{result['cpu_states_seconds']} s ({result['cpu_states_time_ratio']}) / "
                                                   f"{gib(result['cpu_states_peak_gpu_bytes'])} = {result['cpu_states_peak_over_layer']}x layer"),
        ("hidden states between layers", f"{gib(result['hidden_state_bytes'])} on {result['hidden_state_device']}"),
        ("streamed set-up / layers / finish", " / ".join(f"{v} s" for v in result["stream_phase_seconds"].values())),
        ("same kept experts / max tensor diff", f"{result['same_kept_experts']} / {result['max_abs_tensor_diff']:.3g}"),
    ]
    for k, v in rows:
        print(f"{k:<40} {v}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
