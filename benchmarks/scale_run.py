"""The whole user path at real scale, for one preset of ``synth_checkpoint.py``: write the checkpoint in the hub's
layout, ``moe-fx prune --stream on`` from disk (each recipe), reload the output in stock transformers, and decode
with ``moe_fx.compile``; every phase timed, with peak GPU memory, peak CPU memory and disk written.

    python benchmarks/scale_run.py --preset qwen3-30b-a3b --layers 24 --work /data --calib DATA.jsonl.gz \
        --out benchmarks/results/scale_h200/qwen3-30b-a3b.json
    python benchmarks/scale_run.py --preset gpt-oss-20b --tiny --device cpu --work /tmp/scale   # CPU smoke run

Recipes (``--recipes``): ``reap50`` (REAP, half the experts of every layer), ``reap50-comp`` (the same with
compensation), ``obs-channels50-comp`` (half of every expert's channels by ``obs``, then compensation),
``obs-buckets50-comp`` (half of each layer's channels by ``obs`` with per-expert widths, written in width buckets) and
``preset-params50`` / ``preset-params50-seq`` (``--preset best-oneshot-params --ratio 0.5`` without / with
``--sequential``: experts and channels, the best recipe that streams at 50% of the routed parameters) and
``mone50-comp`` (half the experts substituted by constants, MoNE, with the refit). Calibration: ``--sequences`` x ``--seq-len`` tokens (256 x 2048).
Each prune runs as a subprocess, as a user would run it; its peak CPU memory is the child's maximum RSS, its
per-layer seconds and peak GPU memory come from the ``streaming`` entry of the output's ``moe_fx.json``. The
source and every output are deleted when measured (``--keep`` keeps them), so the disk holds one source and one
output at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth_checkpoint import PRESETS, write_checkpoint

RECIPES = {
    "reap50": ["--method", "reap", "--ratio", "0.5"],
    "reap50-comp": ["--method", "reap", "--ratio", "0.5", "--compensate"],
    "obs-channels50-comp": ["--granularity", "channel", "--method", "obs", "--ratio", "0.5", "--compensate"],
    "obs-buckets50-comp": ["--granularity", "channel", "--method", "obs", "--allocation", "buckets-per-layer", "--ratio", "0.5", "--compensate"],
    "preset-params50": ["--preset", "best-oneshot-params", "--ratio", "0.5", "--no-sequential"],
    "preset-params50-seq": ["--preset", "best-oneshot-params", "--ratio", "0.5", "--sequential"],
    "mone50-comp": ["--method", "mone", "--ratio", "0.5", "--compensate"],
}
GIB = 2**30


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def evict_page_cache(path: Path) -> None:
    """Drop ``path``'s safetensors files from the page cache (written back first), so that the prune reads its source
    from the disk, the cold-disk case of the goal (a source just written would otherwise be read from memory).
    ``posix_fadvise`` needs no privileges."""
    os.sync()
    for f in path.rglob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def prune(source: Path, out: Path, recipe: str, args) -> dict:
    """One streamed prune through the CLI; its wall time, child peak RSS, and the record's streaming entry."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    cmd = [sys.executable, "-m", "moe_fx", "prune", str(source), *RECIPES[recipe], "--stream", "on", "--calib", str(args.calib),
           "--calib-tokens", str(args.sequences * args.seq_len), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
           "--device", args.device, "--no-eval", "--quiet", "--out", str(out)]
    if args.cache == "cold":
        evict_page_cache(source)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"recipe": recipe, "error": (proc.stderr or proc.stdout)[-2000:], "seconds": round(seconds, 1)}
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    record = json.loads((out / "moe_fx.json").read_text())
    s = record["streaming"]
    per_layer = list(s["per_layer_seconds"].values())
    mean = {k: round(sum(p[k] for p in per_layer) / len(per_layer), 3) for k in per_layer[0]}
    return {
        "recipe": recipe, "seconds": round(seconds, 1), "stream_seconds": s["seconds"], "layers": s["layers"],
        "calibration_tokens": record["passes"][0]["report"].get("tokens"),  # fewer than asked where --calib is short
        # the loop's wall time a layer; the phases' means overlap it (the shard is written behind the next layer: write_behind)
        "per_layer_mean_seconds": mean, "seconds_per_layer": round(s["phase_seconds"]["layers"] / s["layers"], 3), "phase_seconds": s["phase_seconds"],
        "pass_seconds_per_layer": {f"{i}:{p['name']}": round(p["seconds"] / s["layers"], 3) for i, p in enumerate(record["passes"])},
        "peak_gpu_gib": round(s["peak_gpu_bytes"] / GIB, 2) if s["peak_gpu_bytes"] is not None else None,
        "peak_cpu_rss_gib": round(max(peak_rss, before * 1024) / GIB, 2), "layer_weights_gib": round(s["layer_weight_bytes"] / GIB, 3),
        "hidden_states_gib": round(s["hidden_state_bytes"] / GIB, 2), "disk_written_gib": round(disk_bytes(out) / GIB, 2),
        "expert_format": record.get("expert_format"), "stdout_tail": proc.stdout[-1500:],
    }


@torch.no_grad()
def reload_and_decode(out: Path, device: str, steps: int) -> dict:
    """Stock ``from_pretrained`` of the pruned output, a forward's logits checked finite, then ``moe_fx.compile``d
    greedy decode with a static cache (CUDA graphs on a GPU) at batch 1: tokens per second after compiling. An output
    stored in width buckets loads through its shipped code (``trust_remote_code``, without moe-fx) and is compared with
    the same checkpoint loaded padded (``moe_fx.load(..., ragged=False)``), which is what is compiled. One with experts
    substituted by constants (MoNE) loads through its shipped code too, is compared with ``moe_fx.load`` and is
    compiled as loaded (it has no padded form)."""
    from transformers import AutoModelForCausalLM

    import moe_fx
    from moe_fx.formats.loading import stored_in_buckets
    from moe_fx.model.per_layer import LAYOUT_KEY

    bucketed = stored_in_buckets(out)
    layout = json.loads((out / "config.json").read_text()).get(LAYOUT_KEY) or {"blocks": {}}
    substituted = any("novices" in b for b in layout["blocks"].values())
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, device_map=device, trust_remote_code=bucketed or substituted).eval()
    load_seconds = time.perf_counter() - t0
    ids = torch.randint(3, 8000, (1, 64), device=device, generator=torch.Generator(device).manual_seed(0))
    logits = model(ids).logits
    result = {"reload_ok": bool(torch.isfinite(logits).all()), "reload_seconds": round(load_seconds, 1), "bucketed": bucketed}
    if substituted:
        own = moe_fx.load(out, dtype="bfloat16", device=device).eval()
        result["substituted_remote_vs_moe_fx_load_max_abs_logit_diff"] = round(float((own(ids).logits - logits).abs().max()), 4)
        del own
    elif bucketed:
        padded = moe_fx.load(out, dtype="bfloat16", device=device, ragged=False, experts_implementation=None).eval()
        result["bucketed_vs_padded_max_abs_logit_diff"] = round(float((padded(ids).logits - logits).abs().max()), 4)
        del model
        model = padded
    # held experts per layer, from the config (a substituted model is not traced)
    held = {shape[0] for b in layout["blocks"].values() for n, shape in b["shapes"].items() if n.endswith("experts.down_proj")}
    result["experts_per_layer"] = sorted(held) if substituted else sorted({b.num_experts for b in moe_fx.state_of(model).spec.blocks})
    if steps == 0:
        return result
    try:
        result.update(_decode(model, ids, device, steps))
    except Exception as exc:  # reported beside the reload's result, not instead of it
        result["decode_error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
    return result


def _decode(model, ids: torch.Tensor, device: str, steps: int) -> dict:
    """Greedy decode of ``steps`` tokens after ``ids`` through ``moe_fx.compile`` with a static cache."""
    import moe_fx

    fast = moe_fx.compile(model, mode="reduce-overhead" if device.startswith("cuda") else "default", dynamic=False)
    cache = moe_fx.static_cache(model.config, 64 + steps + 8, rolling_windows=True)  # decode by position, no 2-D mask
    prefill = torch.arange(64, device=device)
    model(input_ids=ids, past_key_values=cache, cache_position=prefill, position_ids=prefill[None], use_cache=True)
    token = ids[:, -1:]
    timings = []
    for i in range(steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        # positions given, as generate() gives them (a model left to derive them reads the cache's length)
        position = torch.tensor([64 + i], device=device)
        token = fast(input_ids=token, past_key_values=cache, cache_position=position, position_ids=position[None], use_cache=True).logits[:, -1:].argmax(-1)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - t)
    steady = sorted(timings[3:])[len(timings[3:]) // 2]  # median after the compiling / recording steps
    return {"compile_seconds": round(sum(timings[:3]), 1), "decode_b1_tok_s": round(1 / steady, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--work", type=Path, required=True, help="directory for the source and the outputs (needs the disk)")
    ap.add_argument("--calib", type=Path, default=Path(__file__).resolve().parents[1] / "examples" / "assets" / "calib.jsonl.gz")
    ap.add_argument("--sequences", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--decode-steps", type=int, default=24, help="0: reload only, no compiled decode")
    ap.add_argument("--cache", choices=("cold", "warm"), default="cold",
                    help="cold: the source is dropped from the page cache before each prune (read from the disk); warm: left there")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import transformers

    args.work.mkdir(parents=True, exist_ok=True)
    source = args.work / f"{args.preset}-src"
    shutil.rmtree(source, ignore_errors=True)
    t0 = time.perf_counter()
    synth = write_checkpoint(args.preset, source, layers=args.layers, tiny=args.tiny, device=args.device, quiet=True,
                             tokenizer=Path(__file__).resolve().parents[1] / "examples" / "assets" / "qwen3moe-micro")
    synth["wall_seconds"] = round(time.perf_counter() - t0, 1)
    result = {"meta": {"preset": args.preset, "tiny": args.tiny, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                       "torch": torch.__version__, "transformers": transformers.__version__, "calibration_tokens": args.sequences * args.seq_len,
                       "batch_size": args.batch_size, "source_cache": args.cache},
              "source": {**synth, "disk_gib": round(disk_bytes(source) / GIB, 2)}, "runs": []}
    print(json.dumps(result["source"]), flush=True)

    def save() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")

    for recipe in args.recipes:
        out = args.work / f"{args.preset}-{recipe}"
        shutil.rmtree(out, ignore_errors=True)
        run = prune(source, out, recipe, args)
        result["runs"].append(run)
        save()  # the prune's numbers are kept even if the reload or decode below fails or runs out of time
        if "error" not in run:
            try:
                run.update(reload_and_decode(out, args.device, args.decode_steps))
            except Exception as exc:  # reported, not hidden: the row says what failed
                run["reload_error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        print(json.dumps({k: v for k, v in run.items() if k != "stdout_tail"}), flush=True)
        save()
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if not args.keep:
        shutil.rmtree(source, ignore_errors=True)
    save()


if __name__ == "__main__":
    main()
