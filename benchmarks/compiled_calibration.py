"""Calibration throughput: eager hooks vs instrumentation compiled into the graph (moe_fx.deliver.graph) vs the plain
compiled forward, side by side in one process, on a trained checkpoint and on a random-weight model with
Qwen3-30B-A3B layer shapes.

    python benchmarks/compiled_calibration.py --device cuda --dtype bfloat16            # GPU machine
    python benchmarks/compiled_calibration.py --device cpu --tiny --batches 2 --seq 64  # smoke test

Every mode runs the same batches with ``torch.no_grad()``; compiled modes are compiled on the first batch, outside
the timing; the modes take turns over ``--rounds`` timed rounds and the median round is reported. ``eager_hooks`` is :func:`moe_fx.calibrate.instrument` (what ``Calibrate`` runs),
``compiled_instrumented`` the :class:`~moe_fx.deliver.graph.InstrumentPass` under Inductor (``Calibrate(compiled=True)``),
``plain_compiled`` ``torch.compile(model, fullgraph=True)`` with no statistics. On CUDA the instrumented graphs replay
as CUDA graphs (Inductor's ``triton.cudagraphs``, as ``Calibrate(compiled=True)`` runs them), and
``plain_cuda_graphs`` (``mode="reduce-overhead"``) is the plain forward in the same mode. The instrumented modes record the
same observers, and their statistics are compared (routes that differ, relative REAP-saliency difference).
Goal (issue 11): compiled calibration >= 0.8x the plain compiled forward and >= 5x the eager hooks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
from common import print_profile
from deploy_speed import build_synthetic, free, log, sync

import moe_fx
from moe_fx.calibrate import OBSERVERS, instrument
from moe_fx.calibrate.data import calibration_tokens
from moe_fx.deliver.graph import InstrumentPass, compiled
from moe_fx.evaluate.table import format_table
from moe_fx.kernels.implementation import set_implementation

REPO = Path(__file__).resolve().parents[1]


def batches_for(model, args, path: str | None) -> list[torch.Tensor]:
    """``args.batches`` batches of ``[batch, seq]`` ids: calibration text for a trained checkpoint, random ids otherwise."""
    n = args.batches * args.batch
    if path is not None:
        tokens = calibration_tokens(str(REPO / "examples" / "assets" / "calib.jsonl.gz"), moe_fx.formats.loading.load_tokenizer(path),
                                    seq_len=args.seq, max_tokens=n * args.seq, seed=0).input_ids
    else:
        tokens = torch.randint(0, model.config.vocab_size, (n, args.seq), generator=torch.Generator().manual_seed(0))
    if tokens.shape[0] < n:
        raise SystemExit(f"only {tokens.shape[0]} windows of {args.seq} tokens available, {n} needed")
    return [tokens[i * args.batch:(i + 1) * args.batch].to(args.device) for i in range(args.batches)]


def one_pass(run, batches: list[torch.Tensor], device: str) -> float:
    """Seconds of ``run`` over every batch (synchronised)."""
    sync(device)
    t0 = time.perf_counter()
    for b in batches:
        run(b)
    sync(device)
    return time.perf_counter() - t0


def run_model(name: str, model, batches: list[torch.Tensor], args) -> dict:
    """Every mode over the same batches: compiled modes warmed up first (their compile time reported), statistics
    compared on one pass each, then ``args.rounds`` timed rounds with the modes interleaved (median reported), so
    that clock and host drift hit every mode alike."""
    spec = moe_fx.state_of(model).spec
    observers = lambda: [OBSERVERS[o]() for o in args.observers]
    forward = lambda m: (lambda b: m(input_ids=b, use_cache=False))
    torch._dynamo.reset()
    pass_ = InstrumentPass(args.observers)
    graphs = {"triton.cudagraphs": True} if args.device.startswith("cuda") else None
    instrumented, be = compiled(model, [pass_], options=graphs)  # what Calibrate(compiled=True) runs
    runners = {"plain_eager": forward(model), "eager_hooks": forward(model), "plain_compiled": forward(torch.compile(model, fullgraph=True))}
    if graphs:
        runners["plain_cuda_graphs"] = forward(torch.compile(model, fullgraph=True, mode="reduce-overhead"))
    runners["compiled_instrumented"] = forward(instrumented)
    compile_s = {}
    with torch.no_grad():
        for mode in [m for m in runners if m not in ("plain_eager", "eager_hooks")]:
            log(f"{name}: compiling {mode}")
            compile_s[mode] = one_pass(runners[mode], batches[:1], args.device)
        log(f"{name}: statistics, one pass each")
        with instrument(model, spec, observers()) as eager_acc:
            one_pass(runners["eager_hooks"], batches, args.device)
            eager_stats = {p: {k: v.clone() for k, v in a.items()} for p, a in eager_acc.items()}
        pass_.reset()
        one_pass(runners["compiled_instrumented"], batches, args.device)
        agreement = compare(pass_.stats(), eager_stats)
        seconds = {mode: [] for mode in runners}
        for r in range(args.rounds):
            log(f"{name}: timed round {r + 1}/{args.rounds}")
            for mode, run in runners.items():
                with instrument(model, spec, observers()) if mode == "eager_hooks" else contextlib.nullcontext():
                    seconds[mode].append(one_pass(run, batches, args.device))
        if args.profile:
            for mode in ("plain_compiled", "compiled_instrumented"):
                profile(mode, runners[mode], batches, args.device)
    tokens = sum(b.numel() for b in batches)
    rows = {mode: {"tokens_per_s": tokens / statistics.median(s), "min_tokens_per_s": tokens / max(s), "max_tokens_per_s": tokens / min(s),
                   "compile_s": compile_s.get(mode)} for mode, s in seconds.items()}
    torch._dynamo.reset()
    free(args.device)
    plain, hooks, ours = (rows[m]["tokens_per_s"] for m in ("plain_compiled", "eager_hooks", "compiled_instrumented"))
    same_mode = rows.get("plain_cuda_graphs", rows["plain_compiled"])["tokens_per_s"]
    return {"modes": rows, "vs_plain_compiled": ours / plain, "vs_plain_same_mode": ours / same_mode, "vs_eager_hooks": ours / hooks,
            "goal_met": ours >= 0.8 * plain and ours >= 5 * hooks, "agreement": agreement,
            "matched_blocks": len(be.report()["matched"]), "blocks": len(spec.blocks)}


def profile(mode: str, run, batches: list[torch.Tensor], device: str) -> None:
    """The kernels of one pass of ``run``, by total device time (where the instrumentation's cost goes)."""
    print_profile(f"{mode}: one pass over {len(batches)} batches", lambda: one_pass(run, batches, device), device)


def compare(got: dict, expected: dict) -> dict:
    """How far the compiled statistics are from the eager ones: share of routes counted differently (near-tie routing
    flips from Inductor's reassociated arithmetic) and the relative L1 difference of REAP saliency."""
    routes = sum(float(a["count"].sum()) for a in expected.values())
    moved = sum(float((got[p]["count"] - a["count"].cpu()).abs().sum()) / 2 for p, a in expected.items())
    tokens = {p: (float(got[p]["tokens"]), float(a["tokens"])) for p, a in expected.items() if "tokens" in a}
    out = {"routes": routes, "routes_moved": moved, "tokens_equal": all(g == e for g, e in tokens.values())}
    if all("reap_sum" in a for a in expected.values()):
        num = sum(float((got[p]["reap_sum"] - a["reap_sum"].cpu()).abs().sum()) for p, a in expected.items())
        den = sum(float(a["reap_sum"].abs().sum()) for a in expected.values())
        out["reap_rel_l1"] = num / den
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO.parent / "shared" / "models" / "qwen3moe-bench"),
                    help="trained checkpoint (empty string: skip)")
    ap.add_argument("--no-synthetic", action="store_true", help="skip the random-weight Qwen3-30B-A3B-shape model")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tiny", action="store_true", help="tiny synthetic shapes (smoke test of the script)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--profile", action="store_true", help="print the top kernels of the compiled modes")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per mode (median reported)")
    ap.add_argument("--observers", default="routing,reap", type=lambda s: tuple(s.split(",")))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "compiled_calibration.json"))
    args = ap.parse_args()
    results = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu", "torch": torch.__version__,
               "dtype": args.dtype, "batch": args.batch, "seq": args.seq, "batches": args.batches, "observers": list(args.observers), "models": {}}
    if args.model:
        model = moe_fx.load(args.model, dtype=args.dtype, device=args.device)
        results["models"][Path(args.model).name] = run_model(Path(args.model).name, model, batches_for(model, args, args.model), args)
        del model
        free(args.device)
    if not args.no_synthetic:
        model = build_synthetic(args, getattr(torch, args.dtype))
        set_implementation(model, "moe_fx")
        name = f"qwen3-30b-a3b-shapes-{args.layers}L" + ("-tiny" if args.tiny else "")
        results["models"][name] = run_model(name, model, batches_for(model, args, None), args)
    modes = list(next(iter(results["models"].values()))["modes"]) if results["models"] else []
    rows = []
    for name, r in results["models"].items():
        agree = r["agreement"]
        rows.append([name, *(f"{r['modes'][m]['tokens_per_s']:,.0f}" for m in modes), f"{r['vs_plain_compiled']:.2f}x",
                     f"{r['vs_plain_same_mode']:.2f}x", f"{r['vs_eager_hooks']:.2f}x",
                     f"{agree['routes_moved']:.0f}/{agree['routes']:.0f}" + ("" if agree.get("tokens_equal", True) else " TOKENS DIFFER"),
                     "met" if r["goal_met"] else "missed"])
    headers = ["model", *(f"{m} tok/s" for m in modes), "vs plain compiled", "vs plain, same mode", "vs eager hooks", "routes moved", "goal"]
    print(format_table(headers, rows, title=f"calibration throughput ({results['device']}, {args.dtype}, {args.batch}x{args.seq})"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
