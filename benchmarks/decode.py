"""Decode and prefill speed of the ``moe_fx`` experts implementation against transformers' ``grouped_mm``, on
random-weight models with Qwen3-30B-A3B layer shapes: unpruned, 50% of the experts dropped, 50% of the
channels removed; every row measured side by side in one run (GPU).

Rows: experts implementation (``grouped_mm``, ``moe_fx``) x mode (``eager``; ``compiled``: torch.compile
fullgraph, default mode; ``cuda-graphs``: mode ``reduce-overhead``). Decode runs with a ``StaticCache`` (the HF
static-cache path; each step a fixed-shape call), teacher-forced random tokens, batches 1/16/64; prefill is
8 x 512 tokens without a cache. The bytes-read ideal of a pruned variant is the weight bytes a decode step
touches (non-routed weights + distinct experts hit x expert bytes, counted on the same inputs) relative to
the unpruned model's. A variant may end in ``:options`` (:func:`runtime_options`), e.g. ``fp8-block:weight-only``.

    python benchmarks/decode.py --layers 4 --out benchmarks/results/decode.json
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import statistics
import time
import traceback
import types
from pathlib import Path

import torch
from common import print_profile
from deploy_speed import accounting, build_synthetic, distinct_hits, free, log, make_variant, random_ids, short, sync

import moe_fx
from moe_fx.deliver.compile import compile_model
from moe_fx.evaluate.table import format_table, human_bytes
from moe_fx.kernels import routed_gemv
from moe_fx.kernels.implementation import set_implementation

MODES = {"eager": None, "compiled": "default", "cuda-graphs": "reduce-overhead"}
STOCK, OURS = "grouped_mm", "moe_fx"
GQA_SWITCH = "TRANSFORMERS_SDPA_FORCE_GQA"
"""transformers' switch for SDPA's own grouped-query attention (``enable_gqa``) even with a mask. Without it, a
compiled static-cache decode step copies the whole cache through ``repeat_kv`` in every layer (0.5 ms of a
2.1 ms b64 step on an H200, ``--profile cuda-graphs/b64``)."""


COMPILE = {"fused": True, "options": None}
"""How moe_fx rows compile: with the top-k kernel and stacked sibling projections (a variant's ``fused=off``
clears it while its rows run) and Inductor ``options`` (``freeze``: ``{"freezing": True}``)."""

INDUCTOR_OPTIONS = {"freeze": {"freezing": True}, "autotune": {"max_autotune": True},
                    "tune=off": {"coordinate_descent_tuning": False}}
"""Variant options that are Inductor config patches (:func:`runtime_options`)."""


def forward_for(model, impl: str, mode: str):
    """The callable a row times: the model itself (eager) or a fresh whole-graph compilation of it (the stock rows
    without moe-fx's top-k kernel: they stand for transformers with torch.compile)."""
    torch._dynamo.reset()
    set_implementation(model, impl)
    if MODES[mode] is None:
        return model
    ours = impl == OURS
    return compile_model(model, experts_implementation=impl, mode=MODES[mode], dynamic=False, fused=ours and COMPILE["fused"],
                         options=COMPILE["options"] if ours else None)


@torch.no_grad()
def decode_ms(model, forward, batch: int, args, profile_title: str | None = None) -> float:
    """Median milliseconds per decode step over ``repeats`` runs of ``steps`` steps (a first, untimed run
    compiles, records the CUDA graphs and warms up); with ``profile_title``, one more run is profiled."""
    vocab = model.config.vocab_size
    cache = moe_fx.static_cache(model.config, args.prompt + args.steps + 8, rolling_windows=True)  # decode by position, no 2-D mask
    dev = args.device
    prompt = random_ids((batch, args.prompt), vocab, 1000 + batch, dev)
    tokens = [t.contiguous() for t in random_ids((batch, args.steps), vocab, 2000 + batch, dev).split(1, dim=1)]
    positions = [torch.tensor([args.prompt + i], device=dev) for i in range(args.steps)]

    def prefilled() -> None:
        cache.reset()
        model(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(args.prompt, device=dev), use_cache=True, logits_to_keep=1)
        sync(dev)

    def steps() -> None:
        for ids, pos in zip(tokens, positions):
            forward(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True)
        sync(dev)

    times = []
    for _ in range(args.repeats + 1):
        prefilled()
        start = time.perf_counter()
        steps()
        times.append((time.perf_counter() - start) / args.steps * 1000)
    if profile_title:
        prefilled()
        print_profile(f"{profile_title} ({args.steps} steps)", steps, dev, ("self_cuda_time_total", "self_cpu_time_total"), rows=22)
    return statistics.median(times[1:])


def one_step_logits(model, step, ids: torch.Tensor, device: str) -> torch.Tensor:
    """Logits of ``step`` on the last column of ``ids`` after the eager ``model`` prefilled the rest into a fresh
    static cache: the decode step the two checks below compare."""
    prompt = ids.shape[1] - 1
    cache = moe_fx.static_cache(model.config, prompt + 8, rolling_windows=True)
    model(input_ids=ids[:, :prompt], past_key_values=cache, cache_position=torch.arange(prompt, device=device), use_cache=True)
    out = step(input_ids=ids[:, prompt:], past_key_values=cache, cache_position=torch.tensor([prompt], device=device), use_cache=True)
    return out.logits.float()


@torch.no_grad()
def step_logits_vs_eager(model, forward, args, batch: int = 2) -> dict:
    """The largest |difference| between one decode step's logits computed by ``forward`` and by the eager model,
    both after the same eager prefill of a 16-token prompt, next to the logits' own largest magnitude."""
    ids = random_ids((batch, 17), model.config.vocab_size, 5, args.device)
    want, got = (one_step_logits(model, step, ids, args.device) for step in (model, forward))
    return {"max_abs_diff": (want - got).abs().max().item(), "max_abs_logit": want.abs().max().item()}


@torch.no_grad()
def prefill(model, forward, args) -> dict:
    """Tokens/s of an ``args.prefill`` (batch x length) forward without a cache, and its peak memory above
    the weights."""
    batch, length = args.prefill
    dev = args.device
    cuda = dev.startswith("cuda")
    ids = random_ids((batch, length), model.config.vocab_size, 7, dev)
    times = []
    peak = None  # measured on CUDA only
    for _ in range(args.prefill_repeats + 1):
        free(dev)
        if cuda:
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        sync(dev)
        start = time.perf_counter()
        forward(input_ids=ids, use_cache=False, logits_to_keep=1)
        sync(dev)
        times.append(time.perf_counter() - start)
        if cuda:
            peak = torch.cuda.max_memory_allocated() - base
    return {"tok_s": batch * length / statistics.median(times[1:]), "peak_above_weights_bytes": peak}


@torch.no_grad()
def use_sdpa_gqa(model, args) -> float:
    """Turn on :data:`GQA_SWITCH` for every row; returns the max |logit difference| of eager static-cache decode
    steps with and without it (the switch picks another attention kernel, it must not change the result)."""
    from transformers.integrations import sdpa_attention

    if GQA_SWITCH not in inspect.getsource(sdpa_attention.use_gqa_in_sdpa):
        raise SystemExit(f"--sdpa-gqa: this transformers ({sdpa_attention.__file__}) has no {GQA_SWITCH} switch")
    set_implementation(model, OURS)
    ids = random_ids((4, 17), model.config.vocab_size, 3, args.device)
    logits = []
    for value in ("0", "1"):
        os.environ[GQA_SWITCH] = value
        logits.append(one_step_logits(model, model, ids, args.device))
    return (logits[0] - logits[1]).abs().max().item()


def attempt(fn):
    """``fn()``'s result, or the error it raised (a failing row is a result, not the end of the run)."""
    try:
        return fn()
    except Exception as exc:
        traceback.print_exc()
        return {"error": short(exc)}


@torch.no_grad()
def read_bandwidth(device: str, gib: float = 4.0, repeats: int = 20) -> float | None:
    """Bytes per second a reduction reads from device memory (median of ``repeats`` sums over a ``gib`` GiB
    tensor), measured in the same process as the decode rows: the roofline's denominator (``None`` on the CPU)."""
    if not device.startswith("cuda"):
        return None
    x = torch.ones(int(gib * 2**30) // 2, dtype=torch.bfloat16, device=device)
    times = []
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        x.sum(dtype=torch.float32)
        sync(device)
        times.append(time.perf_counter() - start)
    nbytes = x.numel() * x.element_size()
    del x
    free(device)
    return nbytes / statistics.median(times[1:])


def measure(model, args, rows: dict, saved=lambda: None) -> dict:
    """Fills ``rows`` (label -> decode/prefill numbers), calling ``saved()`` after each row so that a run cut
    short by a time limit keeps what it measured."""
    for impl in args.impls:
        for mode in args.stock_modes if impl == STOCK else args.modes:
            label = f"{impl}/{mode}"
            forward = attempt(lambda: forward_for(model, impl, mode))
            if isinstance(forward, dict):
                rows[label] = {"error": forward["error"]}
                continue
            row = rows[label] = {"decode": {}}
            for b in args.batches:
                started = time.perf_counter()
                title = f"{label} b{b}" if f"{mode}/b{b}" in args.profile else None
                ms = attempt(lambda: decode_ms(model, forward, b, args, title))
                row["decode"][str(b)] = ms if isinstance(ms, dict) else {"ms_per_step": ms, "tok_s": b * 1000 / ms,
                                                                          "seconds_with_compile": time.perf_counter() - started}
                log(f"  {label:>22} decode b{b:<3} {row['decode'][str(b)]}")
            if mode != "eager" and args.check_logits:
                row["step_logits_vs_eager"] = attempt(lambda: step_logits_vs_eager(model, forward, args))
                log(f"  {label:>22} one step's logits against eager {row['step_logits_vs_eager']}")
            if mode != "cuda-graphs":  # prefill has no cache to replay; CUDA graphs matter for decode
                row["prefill"] = attempt(lambda: prefill(model, forward, args))
                log(f"  {label:>22} prefill {row['prefill']}")
            free(args.device)
            saved()
    return rows


def goals(results: dict, args) -> dict:
    """The issue's three goals, computed from the measured rows (``None`` where a row is missing)."""
    def tok_s(variant: str, label: str, batch: int) -> float | None:
        return results[variant]["rows"].get(label, {}).get("decode", {}).get(str(batch), {}).get("tok_s")

    def best(variant: str, batch: int) -> float | None:
        rates = [tok_s(variant, f"{OURS}/{m}", batch) for m in ("cuda-graphs", "compiled")]
        return max((r for r in rates if r), default=None)

    out: dict = {"batch1_vs_stock_compiled": {}, "pruned_speedup_vs_ideal": {}, "prefill_vs_stock_compiled": {}}
    for v in results:
        stock = tok_s(v, f"{STOCK}/compiled", 1)
        ours = best(v, 1)
        out["batch1_vs_stock_compiled"][v] = ours / stock if ours and stock else None
        p_ours = results[v]["rows"].get(f"{OURS}/compiled", {}).get("prefill", {}).get("tok_s")
        p_stock = results[v]["rows"].get(f"{STOCK}/compiled", {}).get("prefill", {}).get("tok_s")
        out["prefill_vs_stock_compiled"][v] = p_ours / p_stock if p_ours and p_stock else None
    ref = args.variants[0]
    for v in args.variants[1:]:
        for b in args.batches:
            ours, base = best(v, b), best(ref, b)
            ideal = results[ref]["reads"][str(b)]["bytes_per_step"] / results[v]["reads"][str(b)]["bytes_per_step"]
            speedup = ours / base if ours and base else None
            out["pruned_speedup_vs_ideal"][f"{v} b{b}"] = {"speedup": speedup, "ideal": ideal,
                                                            "fraction_of_ideal": speedup / ideal if speedup else None}
    return out


def roofline(results: dict, bandwidth: float | None) -> dict:
    """Per variant, row and batch: the weight bytes a step reads (``reads``) divided by the step's time, as a
    fraction of the measured read bandwidth: 1.0 would be a step that only streams its weights at full speed."""
    if not bandwidth:
        return {}
    out: dict = {}
    for v, res in results.items():
        for label, row in res["rows"].items():
            for b, d in row.get("decode", {}).items():
                if "ms_per_step" in d:
                    out[f"{v} {label} b{b}"] = res["reads"][b]["bytes_per_step"] / (d["ms_per_step"] / 1000) / bandwidth
    return out


def print_tables(results: dict, summary: dict, args) -> None:
    cols = [f"decode b{b} tok/s" for b in args.batches] + [f"prefill {args.prefill[0]}x{args.prefill[1]} tok/s", "prefill peak"]
    for v, res in results.items():
        table = []
        for label, row in res["rows"].items():
            if "error" in row:
                table.append([label, row["error"][:60]] + [""] * (len(cols) - 1))
                continue
            dec = [f"{row['decode'][str(b)]['tok_s']:,.0f}" if "tok_s" in row["decode"][str(b)] else "error" for b in args.batches]
            pre = row.get("prefill", {})
            table.append([label, *dec, f"{pre['tok_s']:,.0f}" if "tok_s" in pre else "-",
                          human_bytes(pre["peak_above_weights_bytes"]) if pre.get("peak_above_weights_bytes") is not None else "-"])
        print(format_table(["experts impl / mode", *cols], table,
                           title=f"{v}: weights {human_bytes(res['accounting']['weights_bytes'])}, "
                                 f"distinct experts per layer per step {[round(res['reads'][str(b)]['distinct_mean'], 1) for b in args.batches]}"))
    print(json.dumps(summary, indent=1))


@contextlib.contextmanager
def runtime_options(options: str):
    """A variant's ``:``-suffix, comma-separated, applied while its rows run: ``weight-only`` keeps quantized
    experts' activations in their dtype (``MOE_FX_QUANTIZED_ACTIVATIONS``), ``gemv=X`` moves the routed GEMV's
    bounds to ``X`` pairs per expert, ``swap=on|off`` sets the grouped kernel's orientation (``SWAP``) whatever
    ``grouped_tiles`` picks, ``grouped-tiles=MxNxKxWxS[xSWAP[xSUBS]]`` sets its tiles where it picks the per-expert
    schedule (few rows per expert: decode), ``fused=off`` leaves the routers' top-k to torch and
    each projection to its own matmul, ``softmax-topk=off`` keeps the routers' softmax (and renormalization) out of
    the top-k kernel, ``attention=sdpa`` keeps decode steps' attention on SDPA (not ``moe_fx::decode_attention``),
    ``gemv-tiles=NxKxW`` sets the routed
    GEMV's dense tiles, ``freeze`` compiles with Inductor's freezing (weights as constants: sibling projections of
    one input become one matmul), ``autotune`` with Inductor's ``max_autotune`` (cuBLAS against Triton templates
    for each matmul), ``tune=off`` without the coordinate-descent tuning of Inductor's own kernels that
    ``moe_fx.compile`` turns on (``moe_fx.deliver.compile.INFERENCE_OPTIONS``),
    ``sdpa=flash|efficient|cudnn|math`` allows that attention backend only. Each row compiles afresh, so each
    sees them."""
    env_before = os.environ.get("MOE_FX_QUANTIZED_ACTIVATIONS")
    bounds_before = routed_gemv.MAX_PAIRS_PER_EXPERT, routed_gemv.WEIGHT_ONLY_MAX_PAIRS_PER_EXPERT
    patched = {}  # (triton_kernels, a tiles function's name) -> the function (imported only where asked: it needs Triton)
    caches = contextlib.ExitStack()
    if options:
        # tiles and the activations' kind are picked while AOTAutograd traces the kernels' ops: a cached compilation
        # of the same Dynamo graph (another variant's row) would bring its choices back
        import torch._functorch.config as functorch_config

        caches.enter_context(functorch_config.patch(enable_autograd_cache=False))
        caches.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
    try:
        for option in filter(None, options.split(",")):
            if option == "weight-only":
                os.environ["MOE_FX_QUANTIZED_ACTIVATIONS"] = "weight-only"
            elif option.startswith("gemv="):
                bound = float(option.removeprefix("gemv="))
                routed_gemv.MAX_PAIRS_PER_EXPERT = routed_gemv.WEIGHT_ONLY_MAX_PAIRS_PER_EXPERT = bound
            elif option == "fused=off":
                COMPILE["fused"] = False
            elif option == "attention=sdpa":
                from moe_fx.deliver import compile as compile_module

                patched.setdefault((compile_module, "replace_decode_attention"), compile_module.replace_decode_attention)
                compile_module.replace_decode_attention = lambda gm: 0
            elif option == "softmax-topk=off":
                from moe_fx.kernels import topk

                patched.setdefault((topk, "_softmax_of"), topk._softmax_of)
                topk._softmax_of = lambda node: None
            elif option in INDUCTOR_OPTIONS:
                COMPILE["options"] = {**(COMPILE["options"] or {}), **INDUCTOR_OPTIONS[option]}
            elif option.startswith("sdpa="):
                from torch.nn.attention import SDPBackend, sdpa_kernel

                name = option.removeprefix("sdpa=")
                backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                           "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}.get(name)
                if backend is None:
                    raise SystemExit(f"unknown attention backend {name!r}: use flash, efficient, cudnn or math")
                caches.enter_context(sdpa_kernel([backend]))
            elif option.startswith("gemv-tiles="):
                from moe_fx.kernels import triton_kernels

                dense = tuple(int(v) for v in option.removeprefix("gemv-tiles=").split("x"))
                tiles = patched.setdefault((triton_kernels, "gemv_tiles"), triton_kernels.gemv_tiles)
                triton_kernels.gemv_tiles = lambda w, quant, dense=dense: dense if quant is None else tiles(w, quant)
            elif option in ("swap=on", "swap=off"):
                from moe_fx.kernels import triton_kernels

                tiles = patched.setdefault((triton_kernels, "grouped_tiles"), triton_kernels.grouped_tiles)
                triton_kernels.grouped_tiles = lambda *a, swap=option == "swap=on": tiles(*a)._replace(swap=swap)
            elif option.startswith("grouped-tiles="):
                from moe_fx.kernels import triton_kernels

                shape = [int(v) for v in option.removeprefix("grouped-tiles=").split("x")]
                tiles = patched.setdefault((triton_kernels, "grouped_tiles"), triton_kernels.grouped_tiles)
                triton_kernels.grouped_tiles = lambda *a, shape=shape: (
                    t if (t := tiles(*a)).tiled else triton_kernels.Tiles(*shape[:5], bool(shape[5:] and shape[5]), False, *shape[6:7]))
            else:
                raise SystemExit(f"unknown variant option {option!r}: use weight-only, gemv=X, swap=on|off, grouped-tiles=MxNxKxWxS[xSWAP[xSUBS]], fused=off, softmax-topk=off, "
                                 "attention=sdpa, gemv-tiles=NxKxW, freeze, autotune, tune=off or sdpa=flash|efficient|cudnn|math")
        yield
    finally:
        os.environ.pop("MOE_FX_QUANTIZED_ACTIVATIONS", None)
        if env_before is not None:
            os.environ["MOE_FX_QUANTIZED_ACTIVATIONS"] = env_before
        routed_gemv.MAX_PAIRS_PER_EXPERT, routed_gemv.WEIGHT_ONLY_MAX_PAIRS_PER_EXPERT = bounds_before
        COMPILE.update(fused=True, options=None)
        for (module, name), function in patched.items():
            setattr(module, name, function)
        caches.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--variants", nargs="+", default=["unpruned", "experts-50%", "channels-50%"])
    ap.add_argument("--impls", nargs="+", default=[STOCK, OURS])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--stock-modes", nargs="+", default=list(MODES), choices=list(MODES), help="modes of the stock rows")
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 16, 64], help="decode batches (none: prefill only)")
    ap.add_argument("--prefill", type=int, nargs=2, default=[8, 512], metavar=("BATCH", "LENGTH"))
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prefill-repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", nargs="*", default=[], metavar="MODE/bBATCH",
                    help="decode rows to profile after timing them, e.g. compiled/b1 cuda-graphs/b64 (top kernels and host operators)")
    ap.add_argument("--out", default="benchmarks/results/decode.json")
    ap.add_argument("--device", default="cuda", help="cpu with --tiny: a smoke test of this script, not a measurement")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes instead of Qwen3-30B-A3B's")
    ap.add_argument("--check-logits", action="store_true", help="each compiled row: one step's logits against eager's (a fresh cache: "
                    "with CUDA graphs it may compile again)")
    ap.add_argument("--sdpa-gqa", action="store_true", help=f"every row with SDPA's grouped-query attention ({GQA_SWITCH}=1)")
    args = ap.parse_args()
    import transformers

    meta = {"torch": torch.__version__, "transformers": transformers.__version__, "layers": args.layers, "shapes": "Qwen3-30B-A3B (random weights)",
            "dtype": "bfloat16", **{k: v for k, v in vars(args).items() if k != "out"},
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    meta["read_bandwidth_bytes_per_s"] = read_bandwidth(args.device)
    if meta["read_bandwidth_bytes_per_s"]:
        log(f"read bandwidth {meta['read_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s")
    base = build_synthetic(types.SimpleNamespace(tiny=args.tiny, layers=args.layers, seed=args.seed, device=args.device), torch.bfloat16)
    if args.sdpa_gqa:
        meta["sdpa_gqa_max_logit_diff"] = use_sdpa_gqa(base, args)
        log(f"{GQA_SWITCH}=1: one decode step's logits differ by {meta['sdpa_gqa_max_logit_diff']:.3g} from without it")
    reads_args = types.SimpleNamespace(decode_batches=args.batches, prompt=args.prompt, decode_steps=args.steps, device=args.device)
    results: dict = {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(args.variants):
        log(f"variant {name}")
        built, _, options = name.partition(":")
        # the last variant prunes the base itself: 48 unpruned layers (61 GB) and a copy do not fit an 80 GB H100
        model = base if built == "unpruned" else make_variant(base, built, args.seed, in_place=i == len(args.variants) - 1)
        acc = accounting(model)
        set_implementation(model, OURS)
        results[name] = {"accounting": acc, "reads": distinct_hits(model, acc, reads_args, model.config.vocab_size)}
        results[name]["rows"] = {}
        with runtime_options(options):
            measure(model, args, results[name]["rows"], lambda: out.write_text(json.dumps({"meta": meta, "variants": results}, indent=1) + "\n"))
        del model
        free(args.device)
    summary = goals(results, args)
    summary["roofline_fraction"] = roofline(results, meta["read_bandwidth_bytes_per_s"])
    out.write_text(json.dumps({"meta": meta, "variants": results, "goals": summary}, indent=1) + "\n")
    print_tables(results, summary, args)


if __name__ == "__main__":
    main()
