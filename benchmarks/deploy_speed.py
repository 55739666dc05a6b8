"""Deploy speed of pruned MoE models: what dropping experts or channels buys at inference, side by side in one run.

Variants of one base model, each a deep copy pruned with moe-fx passes (seeded random kept sets: the choice of
experts or channels does not change speed): ``unpruned``, ``experts-25%``, ``experts-50%`` (each layer drops
that share of its experts) and ``channels-50%`` (every expert keeps half of its intermediate channels: one width
everywhere, stock shapes). Per variant, eager (one row per ``--impls`` experts implementation) and compiled
(``moe_fx.deliver.compile.compile_model``, compiled once per variant with ``dynamic=None``; every timed shape is warmed
up first, and the sequence, batch and cache length are hinted dynamic with ``maybe_mark_dynamic`` so that four
graphs cover a variant instead of six, ``--no-mark-dynamic`` to leave it to automatic dynamic shapes):

- weight bytes and routed-expert bytes;
- prefill tokens/s over a batch x sequence grid (logits of the last position only, as generation does) and
  the peak memory of a prefill at the largest grid point;
- decode tokens/s (a 128-token prompt, then single-token steps with a ``DynamicCache``; only the steps are
  timed) at batch 1 and 16;
- the ideal decode gain: weight bytes read per decode step (everything but the routed experts and the
  embedding table, plus, per layer, the distinct experts the step hits times one expert's bytes; the distinct
  hits are counted on each variant's own routing), unpruned over variant, against the measured gain.

Medians of ``--repeats`` timed runs after ``--warmup`` untimed ones; CUDA timings synchronise around each run.
Prints tables and writes JSON (rewritten after every variant, so a cut-off run keeps what it measured).

    python benchmarks/deploy_speed.py --model qwen3-30b-shapes --layers 4          # random weights, Qwen3-30B-A3B shapes
    python benchmarks/deploy_speed.py --model .device/qwen3moe-bench                # a checkpoint directory
    python benchmarks/deploy_speed.py --model qwen3-30b-shapes --tiny --device cpu --threads 1 \\
        --batches 1 2 --seqs 16 32 --decode-batches 1 4 --prompt 16 --decode-steps 8  # CPU smoke test

On a busy CPU pass ``--threads 1``: OpenMP threads spinning against other processes made timings 100x noisy.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import platform
import re
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import torch._dynamo.utils
import transformers
from transformers import DynamicCache

from moe_fx import PrunePlan, state_of
from moe_fx.deliver.compile import compile_model
from moe_fx.evaluate.nll import model_size
from moe_fx.evaluate.table import format_table, human_bytes
from moe_fx.formats.loading import load_model, parse_dtype
from moe_fx.kernels.implementation import DEFAULT_IMPLEMENTATION, IMPLEMENTATIONS, current, set_implementation
from moe_fx.kernels.quantized import SCALE_SUFFIX, SCHEMES
from moe_fx.model.tensors import get_tensor
from moe_fx.passes import DropExperts, PruneChannels
from moe_fx.plan.plans import ChannelPlan
from moe_fx.rewrite.quantize_experts import quantize_experts_
from moe_fx.rewrite.substitute_experts import hold_novices

SYNTHETIC = "qwen3-30b-shapes"
QWEN3_30B_A3B = {
    "hidden_size": 2048, "num_experts": 128, "moe_intermediate_size": 768, "num_experts_per_tok": 8, "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144, "vocab_size": 151936, "norm_topk_prob": True,
    "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "max_position_embeddings": 40960,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
}
TINY = {"hidden_size": 64, "num_experts": 16, "moe_intermediate_size": 32, "num_experts_per_tok": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "vocab_size": 1024, "max_position_embeddings": 4096}
DEFAULT_VARIANTS = ["unpruned", "experts-25%", "experts-50%", "channels-50%"]
GOAL_VARIANT, GOAL_RATIO = "experts-50%", 0.8


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:400] if text else ''}"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# --- models and variants --------------------------------------------------------------------------------------

def build_synthetic(args, dtype: torch.dtype) -> torch.nn.Module:
    """A random-weight Qwen3MoeForCausalLM with Qwen3-30B-A3B's layer shapes (or tiny ones), built on the device."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    shapes = dict(QWEN3_30B_A3B, **(TINY if args.tiny else {}))
    config = Qwen3MoeConfig(**shapes, num_hidden_layers=args.layers, decoder_sparse_step=1, mlp_only_layers=[],
                            initializer_range=0.02, use_cache=True)
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = Qwen3MoeForCausalLM._from_config(config, dtype=dtype)
    # small normal noise everywhere (routing is not degenerate: router logits have std ~0.02 * sqrt(hidden)),
    # norm scales at one; seeded on the device itself
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.fill_(1.0)
    return model.eval()


def add_model_arguments(ap: argparse.ArgumentParser, *, layers: int) -> None:
    """``--model`` (a directory or the synthetic shapes), ``--layers``, ``--tiny``, ``--device``, ``--dtype``: what
    :func:`build_synthetic` and the speed benchmarks built on it read."""
    ap.add_argument("--model", required=True, help=f"a checkpoint directory, or {SYNTHETIC!r} (random weights, Qwen3-30B-A3B layer shapes)")
    ap.add_argument("--layers", type=int, default=layers, help=f"decoder layers of {SYNTHETIC}")
    ap.add_argument("--tiny", action="store_true", help=f"{SYNTHETIC} with tiny widths (hidden 64, 16 experts, top-4, vocab 1024): smoke tests")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on CPU unless given")


def parse_variant(name: str) -> tuple[str, float, str | None]:
    """(``unpruned`` / ``experts`` / ``channels``, ratio, quantization scheme or ``None``) of a variant name:
    ``unpruned``, ``experts-<N>%``, ``channels-<N>%``, a scheme (``fp8-block``), or a prune ``+`` a scheme."""
    prune, _, scheme = name.partition("+")
    if prune in SCHEMES and not scheme:
        prune, scheme = "unpruned", prune
    if scheme and scheme not in SCHEMES:
        raise SystemExit(f"unknown quantization scheme {scheme!r} in variant {name!r}: use one of {', '.join(SCHEMES)}")
    if prune == "unpruned":
        return "unpruned", 0.0, scheme or None
    m = re.fullmatch(r"(experts|channels|mone)-(\d+(?:\.\d+)?)%", prune)
    if not m:
        raise SystemExit(f"unknown variant {name!r}: use unpruned, experts-<N>%, channels-<N>%, mone-<N>%, a scheme or PRUNE+SCHEME")
    if m.group(1) == "mone" and scheme:
        raise SystemExit(f"variant {name!r}: experts substituted by constants are not quantized (moe-fx refuses it)")
    return m.group(1), float(m.group(2)) / 100, scheme or None


def make_variant(base: torch.nn.Module, name: str, seed: int, in_place: bool = False) -> torch.nn.Module:
    """A deep copy of ``base`` (``base`` itself with ``in_place``: no second model in memory) pruned with moe-fx
    passes along seeded random kept sets, then quantized in memory if the name says so."""
    kind, ratio, scheme = parse_variant(name)
    model = base if in_place else copy.deepcopy(base)
    spec = state_of(model).spec
    g = torch.Generator().manual_seed(seed)
    if kind in ("experts", "mone"):
        plan = PrunePlan({b.path: sorted(torch.randperm(b.num_experts, generator=g)[: b.num_experts - round(b.num_experts * ratio)].tolist())
                          for b in spec.blocks})
        if kind == "experts":
            DropExperts(plan=plan)(model)
        else:  # the same experts substituted by constants (small random ones: speed only, nothing calibrated)
            blocks = [hold_novices(model, b, plan.kept_experts[b.path], 0.01 * torch.randn(b.num_experts, b.experts.hidden_size, generator=g))
                      for b in spec.blocks]
            state_of(model).spec = dataclasses.replace(spec, blocks=tuple(blocks))
    elif kind == "channels":
        kept = {}
        for b in spec.blocks:
            width = b.experts.intermediate_size
            keep = max(1, round(width * (1 - ratio)))
            kept[b.path] = [sorted(torch.randperm(width, generator=g)[:keep].tolist()) for _ in range(b.num_experts)]
        PruneChannels(plan=ChannelPlan(kept, multiple=8))(model)
    if scheme:
        quantize_experts_(model, scheme, state_of(model).spec)
    return model.eval()


def accounting(model: torch.nn.Module) -> dict:
    """Weight bytes, routed-expert bytes and what a decode step reads besides the routed experts."""
    spec = state_of(model).spec
    total = model_size(model)["bytes"]
    per_block = []
    for b in spec.blocks:
        # the experts' weights, and the scales of quantized ones
        experts = model.get_submodule(b.experts.path)
        tensors = [get_tensor(model, n) for n in b.experts.tensors] + [t for n, t in experts.named_buffers() if n.endswith(SCALE_SUFFIX)]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        per_block.append({"path": b.path, "experts": b.num_experts, "width": b.experts.intermediate_size, "top_k": b.top_k,
                          "routed_bytes": nbytes, "expert_bytes": nbytes / b.num_experts})
    routed = sum(r["routed_bytes"] for r in per_block)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.data_ptr()
    embedding = 0 if tied else emb.numel() * emb.element_size()  # decode reads one row of the table; a tied table is the LM head
    return {"weights_bytes": total, "routed_bytes": routed, "non_routed_decode_bytes": total - routed - embedding,
            "embedding_table_bytes": emb.numel() * emb.element_size(), "tied_embeddings": tied, "blocks": per_block}


# --- inputs -----------------------------------------------------------------------------------------------------

def random_ids(shape: tuple[int, ...], vocab: int, seed: int, device: str) -> torch.Tensor:
    return torch.randint(10, vocab - 10, shape, generator=torch.Generator().manual_seed(seed)).to(device)


def decode_inputs(batch: int, args, vocab: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The prompt and the pre-drawn single-token inputs of every step (teacher-forced random tokens: the same
    for every variant, and routing stays as varied as real text's instead of collapsing on a repeated token)."""
    prompt = random_ids((batch, args.prompt), vocab, 1000 + batch, args.device)
    steps = random_ids((batch, args.decode_steps), vocab, 2000 + batch, args.device)
    return prompt, [s.contiguous() for s in steps.split(1, dim=1)]


def new_cache(model, prompt: torch.Tensor, mark_dynamic: bool = False) -> DynamicCache:
    """A ``DynamicCache`` filled with ``prompt`` by the eager model (untimed, and no extra compiled graph).

    ``mark_dynamic``: hint torch.compile that the cached length varies (``maybe_mark_dynamic``), so the first
    decode step compiles the graph every later length reuses instead of a static one recompiled at once."""
    cache = DynamicCache(config=model.config)
    model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
    if mark_dynamic:
        for layer in cache.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor) and t.ndim >= 3:
                    torch._dynamo.maybe_mark_dynamic(t, t.ndim - 2)
    return cache


def dynamic_hint(ids: torch.Tensor, row) -> torch.Tensor:
    """Prefill inputs of a compiled row: sequence (and batch above 1) hinted dynamic, see :func:`new_cache`."""
    if row.compiled and row.mark_dynamic:
        torch._dynamo.maybe_mark_dynamic(ids, 1)
        if ids.shape[0] > 1:
            torch._dynamo.maybe_mark_dynamic(ids, 0)
    return ids


# --- measurements -----------------------------------------------------------------------------------------------

class CompileFailed(Exception):
    pass


class Row:
    """One way of running a variant: eager with an experts implementation, or compiled."""

    def __init__(self, name: str, model, fwd, impl: str, compiled: bool) -> None:
        self.name, self.model, self.fwd, self.impl, self.compiled = name, model, fwd, impl, compiled
        self.failed: str | None = None
        self.mark_dynamic = False
        self.result: dict = {"impl": impl, "compiled": compiled, "prefill": {}, "decode": {}}

    def call(self, **kw):
        if self.failed:
            raise CompileFailed(self.failed)
        try:
            return self.fwd(**kw)
        except Exception as exc:
            if self.compiled and not isinstance(exc, torch.OutOfMemoryError):
                self.failed = short(exc)  # a compile error: later calls would only fail again, slowly
            raise


def batched_mm_bytes(acc: dict, tokens: int) -> float:
    """``batched_mm`` gathers one expert's weights per (token, slot): its transient memory."""
    return max(b["expert_bytes"] * b["top_k"] for b in acc["blocks"]) * tokens


def too_big(row: Row, acc: dict, tokens: int, args) -> str | None:
    if row.impl == "batched_mm" and batched_mm_bytes(acc, tokens) > args.batched_mm_max_gib * 2**30:
        return f"skipped: batched_mm would gather {human_bytes(batched_mm_bytes(acc, tokens))} of expert weights (> --batched-mm-max-gib)"
    return None


def graph_count() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def recompiled(before: int) -> dict:
    """Graphs compiled during the timed runs (should be none: the warm-up runs see every shape)."""
    n = graph_count() - before
    if n:
        log(f"    warning: {n} graph(s) compiled during timed runs; raise --warmup")
    return {"compiled_while_timed": n} if n else {}


def timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def guarded(row: Row, label: str, device: str, fn) -> dict:
    """Run a measurement, turning errors (compile failures, out of memory) into a recorded string."""
    try:
        return fn()
    except CompileFailed as exc:
        return {"error": f"skipped: compile failed earlier ({exc})"}
    except Exception as exc:
        free(device)
        log(f"    {row.name} {label}: {short(exc)}")
        return {"error": short(exc)}


def prefill_point(row: Row, ids: torch.Tensor, args) -> dict:
    """Warm-up, then the median of timed prefills of ``ids`` (logits of the last position only)."""
    step = partial(row.call, input_ids=ids, use_cache=False, logits_to_keep=1)
    warm = sum(timed(step, args.device) for _ in range(args.warmup))
    graphs = graph_count()
    times = [timed(step, args.device) for _ in range(args.repeats)]
    med = statistics.median(times)
    return {"tok_s": ids.numel() / med, "seconds": med, "times": times, "warmup_s": warm, **recompiled(graphs)}


def prefill_peak(row: Row, ids: torch.Tensor, acc: dict, args) -> dict:
    free(args.device)
    torch.cuda.reset_peak_memory_stats()
    row.call(input_ids=ids, use_cache=False, logits_to_keep=1)
    sync(args.device)
    peak = torch.cuda.max_memory_allocated()
    return {"point": "x".join(map(str, ids.shape)), "peak_bytes": peak, "above_weights_bytes": peak - acc["weights_bytes"]}


@torch.no_grad()
def measure_prefill(row: Row, acc: dict, grid: list[tuple[int, int]], args, vocab: int) -> None:
    for b, s in grid:
        key = f"{b}x{s}"
        skip = too_big(row, acc, b * s, args)
        if skip:
            row.result["prefill"][key] = {"error": skip}
            continue
        ids = dynamic_hint(random_ids((b, s), vocab, b * 100_003 + s, args.device), row)
        r = row.result["prefill"][key] = guarded(row, f"prefill {key}", args.device, partial(prefill_point, row, ids, args))
        if "tok_s" in r:
            log(f"    {row.name:>18} prefill {key:>9}: {r['tok_s']:>12,.0f} tok/s  ({r['seconds'] * 1e3:.1f} ms; warm-up {r['warmup_s']:.1f} s)")
    # peak memory of one prefill at the largest grid point this row ran
    done = [(b, s) for b, s in grid if "tok_s" in row.result["prefill"].get(f"{b}x{s}", {})]
    if args.device.startswith("cuda") and done:
        b, s = max(done, key=lambda p: (p[0] * p[1], p[1]))
        ids = random_ids((b, s), vocab, b * 100_003 + s, args.device)
        row.result["peak_prefill"] = guarded(row, "peak memory", args.device, partial(prefill_peak, row, ids, acc, args))


def decode_run(row: Row, prompt: torch.Tensor, steps: list[torch.Tensor], args) -> float:
    """Seconds of the single-token steps after an (untimed, eager) prompt prefill into a fresh cache."""
    cache = new_cache(row.model, prompt, row.compiled and row.mark_dynamic)

    def loop() -> None:
        for ids in steps:
            row.call(input_ids=ids, past_key_values=cache, use_cache=True)

    return timed(loop, args.device)


def decode_point(row: Row, prompt: torch.Tensor, steps: list[torch.Tensor], args) -> dict:
    warm = sum(decode_run(row, prompt, steps, args) for _ in range(args.warmup))  # every cache length the timed runs see
    graphs = graph_count()
    times = [decode_run(row, prompt, steps, args) for _ in range(args.repeats)]
    med = statistics.median(times)
    return {"tok_s": prompt.shape[0] * len(steps) / med, "step_ms": med / len(steps) * 1e3, "times": times, "warmup_s": warm, **recompiled(graphs)}


@torch.no_grad()
def measure_decode(row: Row, acc: dict, args, vocab: int) -> None:
    for batch in args.decode_batches:
        skip = too_big(row, acc, batch, args)
        if skip:
            row.result["decode"][str(batch)] = {"error": skip}
            continue
        prompt, steps = decode_inputs(batch, args, vocab)
        r = row.result["decode"][str(batch)] = guarded(row, f"decode batch {batch}", args.device, partial(decode_point, row, prompt, steps, args))
        if "tok_s" in r:
            log(f"    {row.name:>18} decode batch {batch:>3}: {r['tok_s']:>10,.0f} tok/s  ({r['step_ms']:.2f} ms/step; warm-up {r['warmup_s']:.1f} s)")


def count_hits(counts: list[int], num_experts: int, module, args, kwargs) -> None:
    """Forward pre-hook of an experts module: the distinct experts its call runs."""
    idx = args[1] if len(args) > 1 else next(kwargs[k] for k in ("top_k_index", "router_indices", "selected_experts") if k in kwargs)
    if hasattr(module, "held_slots"):  # substituted experts: the held slots the call runs (a substituted pair at weight 0)
        idx = module.held_slots(idx)[0]
    counts.append(int(torch.unique(idx[idx < num_experts]).numel()))


@torch.no_grad()
def distinct_hits(model, acc: dict, args, vocab: int) -> dict:
    """Per decode batch: the mean number of distinct experts each layer's experts call runs per decode step
    (a forward pre-hook on every experts module reads its ``top_k_index``), and the weight bytes read per step."""
    spec = state_of(model).spec
    out = {}
    for batch in args.decode_batches:
        prompt, steps = decode_inputs(batch, args, vocab)
        cache = new_cache(model, prompt)
        counts: list[list[int]] = [[] for _ in spec.blocks]
        handles = []
        for c, b in zip(counts, spec.blocks):
            hook = partial(count_hits, c, b.num_experts)
            handles.append(model.get_submodule(b.experts.path).register_forward_pre_hook(hook, with_kwargs=True))
        try:
            for ids in steps:
                model(input_ids=ids, past_key_values=cache, use_cache=True)
        finally:
            for h in handles:
                h.remove()
        per_layer = [sum(c) / len(c) for c in counts]
        read = acc["non_routed_decode_bytes"] + sum(d * blk["expert_bytes"] for d, blk in zip(per_layer, acc["blocks"]))
        out[str(batch)] = {"distinct_per_layer": per_layer, "distinct_mean": sum(per_layer) / len(per_layer), "bytes_per_step": read}
        del cache
    return out


def measure_variant(name: str, model, acc: dict, args, grid, vocab: int) -> dict:
    result = {"rows": {}}
    rows: list[Row] = []
    if "eager" in args.modes:
        for impl in args.impls:
            rows.append(Row(f"eager:{impl}", model, model, impl, False))
    if "compiled" in args.modes:
        rows.append(Row("compiled", model, None, args.compile_impl or DEFAULT_IMPLEMENTATION, True))
    for row in rows:
        t0 = time.perf_counter()
        try:
            if row.compiled:
                torch._dynamo.reset()
                graphs0 = graph_count()
                row.mark_dynamic = not args.no_mark_dynamic
                kw = {"mode": args.compile_mode} if args.compile_mode else {}
                row.fwd = compile_model(model, experts_implementation=args.compile_impl, **kw)
            else:
                set_implementation(model, row.impl)
        except Exception as exc:
            row.failed = short(exc)
        if row.failed:
            row.result["error"] = row.failed
            log(f"  {name} {row.name}: {row.failed}")
            result["rows"][row.name] = row.result
            continue
        log(f"  {name} {row.name} (experts implementation {current(model)})")
        measure_prefill(row, acc, grid, args, vocab)
        measure_decode(row, acc, args, vocab)
        row.result["seconds"] = time.perf_counter() - t0
        if row.compiled:
            row.result["graphs"] = graph_count() - graphs0
            row.result["warmup_s"] = sum(r.get("warmup_s", 0.0) for part in ("prefill", "decode") for r in row.result[part].values())
            if row.failed:
                row.result["error"] = row.failed
            row.fwd = None
            torch._dynamo.reset()
        result["rows"][row.name] = row.result
    return result


def gains(results: dict) -> None:
    """Measured decode gain over the unpruned model (same row), the ideal gain and their ratio, in place."""
    ref = results["variants"].get("unpruned")
    ref_reads = results["reference_decode_reads"]
    for v in results["variants"].values():
        v["ideal_decode_gain"] = {b: ref_reads[b]["bytes_per_step"] / r["bytes_per_step"] for b, r in v["decode_reads"].items()}
        for row_name, row in v["rows"].items():
            for b, d in row["decode"].items():
                base = ref["rows"].get(row_name, {}).get("decode", {}).get(b, {}) if ref else {}
                if "tok_s" in d and "tok_s" in base:
                    d["gain"] = d["tok_s"] / base["tok_s"]
                    d["ideal_gain"] = v["ideal_decode_gain"][b]
                    d["gain_over_ideal"] = d["gain"] / d["ideal_gain"]
            for key, p in row["prefill"].items():
                base = ref["rows"].get(row_name, {}).get("prefill", {}).get(key, {}) if ref else {}
                if "tok_s" in p and "tok_s" in base:
                    p["gain"] = p["tok_s"] / base["tok_s"]


def goal(results: dict) -> dict:
    """The issue's goals: decode gain at 50% experts dropped >= 0.8 x ideal; compiled decode >= eager."""
    v = results["variants"].get(GOAL_VARIANT)
    checks = {}
    if v:
        for row_name, row in v["rows"].items():
            for b, d in row["decode"].items():
                if "gain_over_ideal" in d:
                    checks[f"{GOAL_VARIANT} {row_name} batch {b}: gain/ideal >= {GOAL_RATIO}"] = {"value": d["gain_over_ideal"], "ok": d["gain_over_ideal"] >= GOAL_RATIO}
    for name, v in results["variants"].items():
        comp = v["rows"].get("compiled", {}).get("decode", {})
        eager = v["rows"].get(f"eager:{results['options']['impls'][0]}", {}).get("decode", {}) if results["options"]["impls"] else {}
        for b, d in comp.items():
            if "tok_s" in d and "tok_s" in eager.get(b, {}):
                ratio = d["tok_s"] / eager[b]["tok_s"]
                checks[f"{name} batch {b}: compiled / eager decode >= 1"] = {"value": ratio, "ok": ratio >= 1}
    return checks


# --- output -----------------------------------------------------------------------------------------------------

def fmt_rate(d: dict, gain_key: str = "gain") -> str:
    if "tok_s" not in d:
        return "error" if "error" in d and not d["error"].startswith("skipped") else "-"
    return f"{d['tok_s']:,.0f}" + (f" ({d[gain_key]:.2f}x)" if gain_key in d else "")


def print_tables(results: dict) -> None:
    meta = results["meta"]
    batches = [str(b) for b in results["options"]["decode_batches"]]
    rows = []
    for name, v in results["variants"].items():
        a = v["accounting"]
        rows.append([name, "/".join(map(str, sorted({b["experts"] for b in a["blocks"]}))), "/".join(map(str, sorted({b["width"] for b in a["blocks"]}))),
                     human_bytes(a["weights_bytes"]), human_bytes(a["routed_bytes"]), f"{v.get('prune_s', 0):.1f}s"]
                    + [f"{v['decode_reads'][b]['distinct_mean']:.1f}" for b in batches]
                    + [human_bytes(v["decode_reads"][b]["bytes_per_step"]) for b in batches]
                    + [f"{v['ideal_decode_gain'][b]:.2f}x" for b in batches])
    print()
    print(format_table(["variant", "experts/layer", "width", "weights", "routed experts", "prune"] + [f"hit/layer b{b}" for b in batches]
                       + [f"read/step b{b}" for b in batches] + [f"ideal gain b{b}" for b in batches], rows,
                       title=f"{meta['model']} ({meta['layers']} layers) on {meta['device_name']}, {meta['dtype']}: weights and decode reads"))
    grid = results["options"]["grid"]
    rows = []
    for name, v in results["variants"].items():
        for row_name, row in v["rows"].items():
            pk = row.get("peak_prefill", {})
            rows.append([name, row_name] + [fmt_rate(row["prefill"].get(k, {})) for k in grid]
                        + [f"{human_bytes(pk['peak_bytes'])} @{pk['point']}" if "peak_bytes" in pk else "-"])
    print()
    print(format_table(["variant", "mode"] + [f"prefill {k}" for k in grid] + ["peak memory"], rows,
                       title="prefill tokens/s (batch x sequence; vs unpruned, same mode)"))
    rows = []
    for name, v in results["variants"].items():
        for row_name, row in v["rows"].items():
            cells = []
            for b in batches:
                d = row["decode"].get(b, {})
                cells += [fmt_rate(d), f"{d['gain_over_ideal']:.2f}" if "gain_over_ideal" in d else "-"]
            extra = f"{row['warmup_s']:.0f}s, {row['graphs']} graphs" if row.get("compiled") and "graphs" in row else ""
            rows.append([name, row_name] + cells + [extra, row.get("error", "")[:60]])
    print()
    print(format_table(["variant", "mode"] + [h for b in batches for h in (f"decode b{b} tok/s (gain)", "gain/ideal")] + ["compile+warm-up", "error"], rows,
                       title=f"decode tokens/s ({results['options']['prompt']}-token prompt, {results['options']['decode_steps']} steps, DynamicCache; gain vs unpruned, same mode)"))
    if results["goal"]:
        print()
        for k, c in results["goal"].items():
            print(f"{'PASS' if c['ok'] else 'FAIL'}  {k}: {c['value']:.2f}")
    print(f"\ntotal {results['seconds']:.0f} s; JSON: {results['options']['out']}", flush=True)


def write(results: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(ap, layers=4)
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, help="unpruned, experts-<N>%%, channels-<N>%%")
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    ap.add_argument("--impls", nargs="*", default=["grouped_mm", "batched_mm"], choices=IMPLEMENTATIONS, help="experts implementations of the eager rows")
    ap.add_argument("--compile-impl", default=None, choices=IMPLEMENTATIONS, help=f"experts implementation compiled (default {DEFAULT_IMPLEMENTATION})")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (default: none, i.e. 'default')")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="prefill batch sizes")
    ap.add_argument("--seqs", type=int, nargs="+", default=[128, 512, 2048], help="prefill sequence lengths")
    ap.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens before the timed decode steps")
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs of every timed shape (compiled: the first compiles)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported")
    ap.add_argument("--batched-mm-max-gib", type=float, default=16.0,
                    help="skip batched_mm points whose gathered expert weights (tokens x top-k x one expert) exceed this")
    ap.add_argument("--no-mark-dynamic", action="store_true",
                    help="compiled rows: no maybe_mark_dynamic hints on sequence/batch/cache length (more graphs: each first compiles static)")
    ap.add_argument("--recompile-limit", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU smoke tests on a busy machine: 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/deploy_speed.json")
    args = ap.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    variants = list(dict.fromkeys(args.variants))
    for v in variants:
        parse_variant(v)
    grid = [(b, s) for b in args.batches for s in args.seqs]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = args.recompile_limit
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 4 * args.recompile_limit)
    torch._dynamo.config.fail_on_recompile_limit_hit = True  # an error recorded, not a silent fall back to eager

    t_start = time.perf_counter()
    dtype = parse_dtype(args.dtype)
    log(f"building {args.model} on {args.device} ({args.dtype})")
    base = build_synthetic(args, dtype) if args.model == SYNTHETIC else load_model(args.model, dtype=args.dtype, device=args.device)
    vocab = base.config.get_text_config().vocab_size
    base_acc = accounting(base)
    spec = state_of(base).spec
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else (platform.processor() or platform.machine())
    log(f"{len(spec.blocks)} MoE blocks, {spec.blocks[0].num_experts} experts (top-{spec.blocks[0].top_k}), width {spec.blocks[0].experts.intermediate_size}; "
        f"weights {human_bytes(base_acc['weights_bytes'])}, routed experts {human_bytes(base_acc['routed_bytes'])}; built in {time.perf_counter() - t_start:.1f} s")
    if args.impls:
        set_implementation(base, args.impls[0])
    # the process's first GPU work runs slower (clocks, allocator, cuBLAS handles): warm up on the base first
    with torch.no_grad():
        b, s = min(grid, key=lambda p: p[0] * p[1])
        for _ in range(2):
            base(input_ids=random_ids((b, s), vocab, 7, args.device), use_cache=False, logits_to_keep=1)
        prompt, steps = decode_inputs(args.decode_batches[0], args, vocab)
        cache = new_cache(base, prompt)
        for ids in steps[:8]:
            base(input_ids=ids, past_key_values=cache, use_cache=True)
        del cache
    sync(args.device)
    reference_reads = distinct_hits(base, base_acc, args, vocab)

    results = {
        "meta": {"model": args.model, "layers": spec.num_layers, "device": args.device, "device_name": device_name, "dtype": args.dtype,
                 "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
                 "experts": spec.blocks[0].num_experts, "top_k": spec.blocks[0].top_k, "width": spec.blocks[0].experts.intermediate_size,
                 "hidden": spec.blocks[0].experts.hidden_size, "vocab": vocab,
                 "prefill_logits": "last position only (logits_to_keep=1)", "decode_inputs": "pre-drawn random tokens (teacher-forced)"},
        "options": dict(vars(args), grid=[f"{b}x{s}" for b, s in grid]),
        "reference_decode_reads": reference_reads,
        "variants": {}, "goal": {}, "seconds": 0.0,
    }
    for name in variants:
        t0 = time.perf_counter()
        log(f"variant {name}")
        model = make_variant(base, name, args.seed + 1)
        prune_s = time.perf_counter() - t0
        acc = accounting(model)
        if args.impls:
            set_implementation(model, args.impls[0])
        reads = distinct_hits(model, acc, args, vocab)
        log(f"  weights {human_bytes(acc['weights_bytes'])}, routed {human_bytes(acc['routed_bytes'])}; distinct experts hit per layer per decode step: "
            + ", ".join(f"batch {b}: {r['distinct_mean']:.1f}" for b, r in reads.items()))
        v = measure_variant(name, model, acc, args, grid, vocab)
        v.update(accounting=acc, decode_reads=reads, prune_s=prune_s, seconds=time.perf_counter() - t0)
        results["variants"][name] = v
        del model
        free(args.device)
        results["seconds"] = time.perf_counter() - t_start
        gains(results)
        results["goal"] = goal(results)
        write(results, args.out)
        log(f"  {name} done in {v['seconds']:.0f} s (total {results['seconds']:.0f} s)")
    print_tables(results)


if __name__ == "__main__":
    main()
