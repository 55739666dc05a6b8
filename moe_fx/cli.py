"""The ``moe-fx`` command: ``inspect``, ``prune``, ``sweep``, ``eval``, ``report``, ``export``.

Errors caused by the input (paths, options, data) print one line naming the problem and exit with 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch

from .errors import MoeFxError


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MoeFxError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return name


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto (checkpoint's), float32, bfloat16, float16")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-seqs", type=int, default=8, help="evaluation windows per domain (default 8)")
    p.add_argument("--eval-seq-len", type=int, default=512, help="evaluation window length in tokens (default 512)")
    p.add_argument("--eval-stride", type=int, help="sliding-window perplexity: windows start this many tokens apart, each token is "
                   "scored once with up to seq-len - stride tokens of extra context (default: seq-len, no overlap)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")


def _add_tasks(p: argparse.ArgumentParser, *, tasks_flag: str = "--tasks", limit_flag: str = "--limit") -> None:
    g = p.add_argument_group("zero-shot tasks (lm-eval's prompts and metrics, offline)")
    g.add_argument(tasks_flag, dest="tasks", help="comma list of blimp, lambada_openai, hellaswag, piqa, arc_easy, arc_challenge, copa, "
                   "winogrande, boolq, openbookqa, blimp_<paradigm>; 'default' (those that separate small models) or 'all'")
    g.add_argument(limit_flag, dest="limit", type=int, help="first N items of each task (of each BLiMP paradigm)")
    g.add_argument("--task-data", default=os.environ.get("MOE_FX_EVAL_DATA"),
                   help="directory of the task files (llm_foundry/, blimp/, hellaswag/ as in shared/data/eval; default $MOE_FX_EVAL_DATA)")
    g.add_argument("--no-cache", action="store_true", help="score every request again (default: reuse a checkpoint's cached log-likelihoods)")


def _add_data(p: argparse.ArgumentParser) -> None:
    """Calibration, output and before/after evaluation options (prune and sweep)."""
    p.add_argument("--calib", help="calibration text: .txt or .jsonl(.gz) with a 'text' field (needed except for --method random)")
    p.add_argument("--calib-tokens", type=int, default=200_000, help="calibration tokens (default 200000)")
    p.add_argument("--seq-len", type=int, default=512, help="calibration window length (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed for data order and random scores (default 0)")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--eval-data", help="held-out .jsonl(.gz)/.txt for NLL before/after (default: a held-out slice of --calib)")
    p.add_argument("--holdout", type=float, default=0.05, help="fraction of --calib documents held out when --eval-data is absent")
    p.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    _add_tasks(p, tasks_flag="--eval-tasks", limit_flag="--task-limit")


class _VersionAction(argparse.Action):
    """``--version``: the stack's versions, read from package metadata (nothing heavy is imported)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from .environment import version_line

        print(version_line())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-fx", description="Make Mixture-of-Experts models smaller: trace, calibrate, prune, save.")
    parser.add_argument("--version", action=_VersionAction, help="print the versions of moe-fx, torch, transformers and onnxruntime, and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="describe every MoE block of a checkpoint")
    p.add_argument("model", help="checkpoint directory (transformers format)")
    p.add_argument("--verify", action="store_true", help="check each block's routing spec against its torch.export graph")
    p.add_argument("--all-blocks", action="store_true", help="with --verify: check every block, not one per block class")
    p.add_argument("--json", action="store_true", help="print the spec as JSON")
    _add_common(p)

    p = sub.add_parser("prune", help="calibrate, score and drop experts (or channels inside experts); save a checkpoint")
    p.add_argument("model", help="source checkpoint directory (never modified)")
    p.add_argument("--granularity", default="expert", choices=("expert", "channel"),
                   help="expert: drop whole experts; channel: remove intermediate channels inside the experts (default expert)")
    p.add_argument("--method", help="expert scoring: reap (default), shape, naee, frequency, random; or eep (evolutionary search "
                   "warm-started from --eep-warm-start); a merge- prefix (merge-reap) is the same as --merge. "
                   "channel scoring (--granularity channel): fisher (default), heapr, coverage, activation, weight")
    p.add_argument("--merge", action="store_true", help="fold each dropped expert into its most similar kept expert instead of discarding it")
    p.add_argument("--compensate", action="store_true",
                   help="after dropping, refit the kept experts' down projections (ridge least squares) to reproduce each block's original output")
    p.add_argument("--ridge", type=float, default=1.0, help="--compensate: pull towards the current weights, relative to each expert's activation energy (default 1.0)")
    p.add_argument("--compensate-samples", type=int, default=16384, help="--compensate: calibration tokens per layer it fits on (default 16384)")
    p.add_argument("--distill-steps", type=int, default=0,
                   help="after pruning, fine-tune the routed experts and routers towards the unpruned model's logits (KL) for this many "
                        "steps of --batch-size calibration windows (moe_fx.passes.Distill; default 0: off). Holds the source model in memory too")
    p.add_argument("--distill-lr", type=float, default=3e-4, help="--distill-steps: peak AdamW learning rate (default 3e-4)")
    p.add_argument("--allocation", default="uniform", choices=("uniform", "global", "layer", "expert", "coverage"),
                   help="experts: uniform (same count in every layer; stock config) or global (ranked across layers; per-layer format). "
                   "channels: uniform (same width everywhere; stock config), layer (one width per layer), expert (HEAPr-style "
                   "global ranking, a width per expert) or coverage (Ding et al. score coverage)")
    chan = p.add_argument_group("channel pruning (--granularity channel)")
    chan.add_argument("--multiple", type=int, default=64, help="per-expert widths are padded to the layer's widest, rounded up to this (default 64)")
    chan.add_argument("--expert-ratio", type=float, help="first drop this fraction of each layer's experts (scored by --expert-method), then --ratio of the kept experts' channels")
    chan.add_argument("--expert-method", default="reap", help="expert scoring for --expert-ratio (default reap)")
    eep = p.add_argument_group("eep search (--method eep)")
    eep.add_argument("--eep-warm-start", default="reap", help="scorer whose plan seeds the search (default reap)")
    eep.add_argument("--eep-population", type=int, default=16, help="plans per generation (default 16)")
    eep.add_argument("--eep-generations", type=int, default=20, help="generations (default 20)")
    eep.add_argument("--eep-max-seconds", type=float, help="stop the search after this many seconds")
    eep.add_argument("--fitness-tokens", type=int, default=16384, help="calibration tokens held out as the search's fitness set (default 16384)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--ratio", type=float, help="fraction of each block's experts to drop, in (0, 1); with --granularity channel: "
                        "fraction of the routed experts' channels (= routed-FFN parameters) to remove")
    budget.add_argument("--keep", type=int, help="experts to keep per block")
    _add_data(p)
    p.add_argument("--compiled-calibration", action="store_true",
                   help="record the calibration statistics inside the torch.compile graph (moe_fx.graph; CUDA graphs on GPU): the "
                        "same statistics as the default hooks, several times faster on a GPU; routing/REAP/channel-activation "
                        "statistics only (not --merge, --compensate, search scorers or gradient scorers)")
    p.add_argument("--stream", default="auto", choices=("auto", "on", "off"),
                   help="prune one decoder layer at a time, never holding the whole model: on, off, or auto (default: on when "
                        "the checkpoint's weights exceed 80%% of the device's free memory); forward-only methods with uniform allocation")
    p.add_argument("--nproc", type=int, default=1, help="calibrate with this many processes on this host (runs torchrun; "
                   "or launch `torchrun --nproc-per-node N -m moe_fx prune ...` yourself)")
    _add_eval(p)
    _add_common(p)

    p = sub.add_parser("sweep", help="prune at several methods x ratios from one calibration; table, JSON and quality-vs-ratio plots")
    p.add_argument("model", help="source checkpoint directory (never modified)")
    p.add_argument("--methods", default="random,frequency,reap",
                   help="comma list of scoring methods (reap, frequency, random, shape, naee, merge-<method>; channel methods "
                        "fisher, heapr, coverage, activation, weight); default random,frequency,reap")
    p.add_argument("--ratios", default="0.25,0.5", help="comma list of fractions to prune, each in (0, 1) (default 0.25,0.5)")
    p.add_argument("--allocation", default="uniform", help="allocation for every point (uniform, global; channel: layer, expert, coverage)")
    p.add_argument("--compensate", action="store_true", help="refit kept experts after every rewrite")
    p.add_argument("--save", action="store_true", help="also save each pruned checkpoint under OUT/checkpoints/<method>-<percent>")
    _add_data(p)
    _add_eval(p)
    _add_common(p)

    p = sub.add_parser("export", help="export a (pruned) checkpoint for a runtime: onnx (onnxruntime, Optimum)")
    p.add_argument("format", choices=("onnx",), help="target format")
    p.add_argument("model", help="checkpoint directory (pruned by moe-fx or stock transformers)")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    past = p.add_mutually_exclusive_group()
    past.add_argument("--with-past", dest="with_past", action="store_true", default=True,
                      help="KV-cache inputs and outputs for generation (default; Optimum's decoder layout)")
    past.add_argument("--no-past", dest="with_past", action="store_false", help="logits from the whole sequence only")
    p.add_argument("--dtype", default="float32", help="graph precision: float32 (default), float16, bfloat16")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the newest onnxscript writes)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-PyTorch parity check")
    p.add_argument("--device", default="cpu", help="device the model is traced and checked on (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("report", help="(re)write report.md, report.json and plots/ of a checkpoint moe-fx pruned, from its moe_fx.json")
    p.add_argument("model", help="checkpoint directory written by moe-fx prune")

    p = sub.add_parser("eval", help="per-domain NLL / perplexity and zero-shot task accuracy of one or more checkpoints")
    p.add_argument("models", nargs="+", help="checkpoint directories; with several, deltas are shown against the first")
    p.add_argument("--data", help=".jsonl(.gz) with 'text' (and 'domain') fields, or .txt (WikiText-2's valid.txt, say)")
    p.add_argument("--json", help="also write the results to this JSON file")
    _add_eval(p)
    _add_tasks(p)
    _add_common(p)
    return parser


def cmd_inspect(args) -> int:
    from .loading import load_model
    from .pipeline import state_of
    from .table import format_table

    model = load_model(args.model, dtype=args.dtype, device=_device(args.device))
    spec = state_of(model).spec
    if args.json:
        print(json.dumps(spec.to_dict(), indent=2))
        return 0
    rows = spec.summary_rows()
    print(format_table(list(rows[0]), [list(r.values()) for r in rows], title=f"{args.model}: {spec.model_type} ({spec.family} adapter), {len(spec.blocks)} MoE blocks of {spec.num_layers} layers"))
    print(f"dense layers: {list(spec.dense_layers) or 'none'}")
    print(f"config keys holding the expert count: {', '.join(spec.config_count_keys) or 'none'}")
    b = spec.blocks[0]
    print(f"per-expert tensors (block 0): {', '.join(b.per_expert_tensors)}")
    if b.shared:
        print(f"shared experts (block 0): {', '.join(s.path for s in b.shared)}")
    if args.verify:
        from .fx_check import verify

        checks = verify(model, spec, all_blocks=args.all_blocks)
        vrows = [[c.block, "ok" if c.ok else "MISMATCH", c.graph.score_fn if c.graph else "-", c.graph.top_k if c.graph else "-", "; ".join(c.mismatches) or (c.error or "")] for c in checks]
        print(format_table(["block", "fx check", "graph score", "graph top_k", "details"], vrows, title="torch.export graph check"))
        return 0 if all(c.ok for c in checks) else 1
    return 0


def _eval_rows(results: list[dict], names: list[str]) -> tuple[list[str], list[list]]:
    domains = [d for d in results[0] if d not in ("mean", "all")] + ["mean", "all"]
    headers = ["domain"] + [f"NLL {n}" for n in names] + [f"PPL {n}" for n in names] + [f"delta {n}" for n in names[1:]]
    rows = []
    for d in domains:
        vals = [r[d]["nll"] for r in results]
        rows.append([d] + [f"{v:.4f}" for v in vals] + [f"{r[d]['ppl']:.2f}" for r in results] + [f"{v - vals[0]:+.4f}" for v in vals[1:]])
    return headers, rows


def _task_rows(results: list[dict], names: list[str]) -> tuple[list[str], list[list]]:
    """Zero-shot table: a row per (task, metric), accuracy in % with its standard error, deltas against the first."""
    headers = ["task", "metric"] + names + [f"delta {n}" for n in names[1:]]
    rows = []
    for task, first in results[0].items():
        for metric in [m for m in ("acc", "acc_norm", "ppl") if m in first]:
            vals = [r[task][metric] for r in results]
            if metric == "ppl":
                rows.append([task, metric] + [f"{v:.2f}" for v in vals] + [f"{v / vals[0] - 1:+.1%}" for v in vals[1:]])
                continue
            err = [r[task].get(f"{metric}_stderr") for r in results]
            rows.append([task, metric] + [f"{100 * v:.1f}" + (f" ±{100 * e:.1f}" if e == e and e is not None else "") for v, e in zip(vals, err)]
                        + [f"{100 * (v - vals[0]):+.1f}" for v in vals[1:]])
    return headers, rows


def _task_dir(args) -> str:
    if not args.task_data:
        raise MoeFxError("zero-shot tasks need their files: pass --task-data DIR (the layout of shared/data/eval: llm_foundry/, "
                         "blimp/, hellaswag/) or set MOE_FX_EVAL_DATA")
    return args.task_data


def _zero_shot(model, tokenizer, args, device: str, checkpoint: str | Path | None = None) -> dict:
    """Zero-shot results of ``model``; cached per checkpoint (a model read from disk unchanged) unless --no-cache."""
    from .zero_shot import LoglikCache, evaluate_tasks
    from .zero_shot.loglik import max_length_of

    cache = None
    if checkpoint is not None and not args.no_cache:
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        cache = LoglikCache.for_checkpoint(checkpoint, dtype=dtype, device=device, max_length=max_length_of(model))
    return evaluate_tasks(model, tokenizer, args.tasks, data_dir=_task_dir(args), limit=args.limit, batch_tokens=args.batch_size * args.eval_seq_len,
                          cache=cache, show_progress=not args.quiet)


def _calibration_and_eval(args, tokenizer) -> tuple[list, object]:
    """Calibration documents and the evaluation set (``--eval-data``, else a held-out share of ``--calib``;
    none with ``--no-eval``, or on ranks other than the first, which only help calibrate)."""
    from . import distributed
    from .data import read_documents, split_holdout
    from .evaluate import build_eval_set

    calib_docs, eval_docs = (read_documents(args.calib), None) if args.calib else ([], None)
    if args.eval_data:
        eval_docs = read_documents(args.eval_data)
    elif calib_docs and not args.no_eval:
        calib_docs, eval_docs = split_holdout(calib_docs, args.holdout, args.seed)
    if not eval_docs or args.no_eval or not distributed.is_main():
        return calib_docs, None
    return calib_docs, build_eval_set(eval_docs, tokenizer, seq_len=args.eval_seq_len, seqs_per_domain=args.eval_seqs, stride=args.eval_stride)


def cmd_eval(args) -> int:
    from .evaluate import build_eval_set, evaluate_nll
    from .loading import load_model, load_tokenizer
    from .table import format_table
    from .zero_shot import resolve_tasks

    if not args.data and not args.tasks:
        raise MoeFxError("nothing to evaluate: give --data FILE (NLL / perplexity) and/or --tasks NAMES (zero-shot accuracy)")
    if args.tasks:
        resolve_tasks(args.tasks, _task_dir(args))  # bad names or files fail before any model loads
    device = _device(args.device)
    tokenizer = load_tokenizer(args.models[0])
    eval_set = build_eval_set(args.data, tokenizer, seq_len=args.eval_seq_len, seqs_per_domain=args.eval_seqs, stride=args.eval_stride) if args.data else None
    results = []
    for path in args.models:
        model = load_model(path, dtype=args.dtype, device=device)
        entry = {}
        if eval_set:
            entry["nll"] = evaluate_nll(model, eval_set, batch_size=args.batch_size, show_progress=not args.quiet)
        if args.tasks:
            entry["tasks"] = _zero_shot(model, tokenizer, args, device, checkpoint=path)
        results.append(entry)
        del model
    names = [Path(m).name for m in args.models]
    if eval_set:
        print(format_table(*_eval_rows([r["nll"] for r in results], names), title=f"next-token NLL on {args.data} ({eval_set.scored_tokens:,} tokens scored)"))
    if args.tasks:
        limit = f", first {args.limit} items per task" if args.limit else ""
        print(format_table(*_task_rows([r["tasks"] for r in results], names), title=f"zero-shot accuracy (%){limit}"))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(zip(args.models, results)), indent=2) + "\n")
    return 0


def cmd_prune(args) -> int:
    from . import distributed
    from .data import TokenBatch, pack, split_fitness
    from .evaluate import checkpoint_size, disk_size, evaluate_nll, model_size
    from .exporters.checkpoint import check_output_path, save_checkpoint, update_record
    from .lazy_checkpoint import meta_model
    from .loading import check_model_dir, load_model, load_tokenizer
    from .passes import Calibrate, CompensateExperts, Distill, DropExperts, Score
    from .passes.allocate import check_budget
    from .passes.eep import EvolutionarySearch
    from .passes.scorers import get_scorer
    from .pipeline import compose, state_of
    from .recipe import observers_for, parse_method, prune_passes
    from .report import write_report
    from .streaming import stream_evaluate, stream_prune
    from .table import format_table, human_bytes
    from .zero_shot import resolve_tasks

    source = check_model_dir(args.model)
    check_output_path(args.out, source, args.overwrite)
    if args.tasks:
        resolve_tasks(args.tasks, _task_dir(args))
    channels = args.granularity == "channel"
    args.method, merge = parse_method(args.method or ("fisher" if channels else "reap"))
    args.merge = args.merge or merge
    search = args.method == "eep"
    scorer = get_scorer(args.eep_warm_start if search else args.method, seed=args.seed)
    expert_scorer = get_scorer(args.expert_method, seed=args.seed) if channels and args.expert_ratio else None
    _check_granularity(args, scorer, expert_scorer)
    if args.compiled_calibration:
        from .graph import GRAPH_OBSERVERS

        needed = observers_for([s for s in (scorer, expert_scorer) if s], merge=args.merge, compensate=args.compensate)
        eager_only = [o for o in needed if o not in GRAPH_OBSERVERS]
        if eager_only:
            raise MoeFxError(f"--compiled-calibration records {', '.join(GRAPH_OBSERVERS)} statistics only; this run needs "
                             f"{', '.join(eager_only)} (sampled or gradient statistics): drop --compiled-calibration")
    needs_data = scorer.needs or (expert_scorer and expert_scorer.needs)
    needs_windows = needs_data or search or args.merge or args.compensate or args.distill_steps
    if needs_windows and not args.calib:
        raise MoeFxError(f"--method {args.method}{' --merge' if args.merge else ''}{' --compensate' if args.compensate else ''}"
                         f"{' --distill-steps' if args.distill_steps else ''} needs calibration data: pass --calib FILE")
    if args.distill_steps < 0 or not args.distill_lr > 0:
        raise MoeFxError(f"--distill-steps must be >= 0 and --distill-lr > 0, got {args.distill_steps} and {args.distill_lr}")
    if args.calib_tokens < 1 or args.seq_len < 2:
        raise MoeFxError("--calib-tokens must be positive and --seq-len at least 2")
    device = _device(args.device)
    if distributed.init_from_env(device) and device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    stream = _streaming(args, source, device, search)
    if stream and args.distill_steps:
        raise MoeFxError("--distill-steps trains the whole model, which a streamed prune never holds; use --stream off")
    if stream and args.compiled_calibration:
        raise MoeFxError("--compiled-calibration compiles the whole model, which a streamed prune never holds; use --stream off")
    if stream and args.tasks:
        raise MoeFxError("--eval-tasks needs the whole model in memory, which a streamed prune never holds; run "
                         "`moe-fx eval SOURCE OUT --tasks ...` on a device that holds it, or use --stream off")
    # the model's structure without its weights: options the family cannot take are refused before loading
    meta = meta_model(source, args.dtype, device)
    spec = state_of(meta).spec
    if not channels or args.expert_ratio:
        check_budget(spec, ratio=args.expert_ratio if channels else args.ratio, keep=None if channels else args.keep)
    tokenizer = load_tokenizer(source)
    calib_docs, eval_set = _calibration_and_eval(args, tokenizer)
    show = not args.quiet and distributed.is_main()

    passes = []
    allocation = args.allocation
    if needs_windows:
        windows = pack(tokenizer, calib_docs, seq_len=args.seq_len, max_tokens=args.calib_tokens + (args.fitness_tokens if search else 0), seed=args.seed)
        if search:
            windows, fitness = split_fitness(windows, args.fitness_tokens)
            allocation = EvolutionarySearch(
                fitness, population=args.eep_population, generations=args.eep_generations, max_seconds=args.eep_max_seconds,
                allocation=args.allocation, batch_size=args.batch_size, seed=args.seed, show_progress=show,
                refine=CompensateExperts(ridge=args.ridge) if args.compensate and not args.merge else None,
            )
        scorers = [scorer] + ([expert_scorer] if expert_scorer else [])
        passes.append(Calibrate(TokenBatch(windows, args.calib), batch_size=args.batch_size, seed=args.seed,
                                observers=observers_for(scorers, merge=args.merge, compensate=args.compensate),
                                inputs_per_block=args.compensate_samples, show_progress=show, compiled=args.compiled_calibration))
    if expert_scorer:
        passes += [Score(expert_scorer.name, seed=args.seed), DropExperts(ratio=args.expert_ratio)]
    passes += prune_passes(scorer, spec, ratio=args.ratio, keep=args.keep, merge=args.merge, compensate=args.compensate,
                           allocation=allocation, multiple=args.multiple, seed=args.seed, ridge=args.ridge)
    if args.distill_steps:
        passes.append(Distill(teacher=source, data=TokenBatch(windows, args.calib), steps=args.distill_steps, lr=args.distill_lr,
                              batch_size=args.batch_size, seed=args.seed, show_progress=show))
    compose(*passes).check_model(meta)

    model = meta if stream else load_model(source, dtype=args.dtype, device=device)
    save_dtype = model.config.dtype if isinstance(getattr(model.config, "dtype", None), torch.dtype) else next(model.parameters()).dtype
    size_of = checkpoint_size if stream else model_size
    evaluate = functools.partial(stream_evaluate, device=device, dtype=args.dtype) if stream else evaluate_nll
    before_size = size_of(source if stream else model)
    before = evaluate(source if stream else model, eval_set, batch_size=args.batch_size, show_progress=show) if eval_set else None
    tasks_before = _zero_shot(model, tokenizer, args, device, checkpoint=source) if args.tasks and distributed.is_main() else None

    t0 = time.perf_counter()
    if stream:
        streamed = stream_prune(source, args.out, passes, device=device, dtype=args.dtype, tokenizer=tokenizer,
                                overwrite=args.overwrite, show_progress=show, report=False)  # written once, with the evaluations
        if streamed is None:  # another rank: rank 0 writes, evaluates and reports
            return 0
        out, state = streamed.out, streamed.state
    else:
        model = compose(*passes)(model)
        state = state_of(model)
    prune_seconds = time.perf_counter() - t0
    after = evaluate(out if stream else model, eval_set, batch_size=args.batch_size, show_progress=show) if eval_set else None
    after_size = size_of(out if stream else model)
    tasks_after = _zero_shot(model, tokenizer, args, device) if args.tasks and distributed.is_main() else None

    if not distributed.is_main():
        return 0
    record = {
        "cli": {k: v for k, v in vars(args).items() if k != "func"},
        "eval_before": before,
        "eval_after": after,
        "eval_source": args.eval_data or (f"held-out {args.holdout:.0%} of {args.calib}" if eval_set else None),
        "tasks_before": tasks_before,
        "tasks_after": tasks_after,
        "size_before": before_size,
        "size_after": after_size,
        "prune_seconds": prune_seconds,
        "world_size": distributed.world_size(),
    }
    if stream:
        update_record(out, record)
        write_report(out)
    else:
        model.to(save_dtype)
        record["size_after"] = model_size(model)
        out = save_checkpoint(model, args.out, source=source, tokenizer=tokenizer, overwrite=args.overwrite, extra_record=record)

    kept = sum(b.num_experts for b in state.spec.blocks)
    total = sum(b.num_experts for b in spec.blocks)
    per_block = sorted({b.num_experts for b in state.spec.blocks})
    channel_report = state.report_of("prune_channels")
    disk_before, disk_after = disk_size(source), disk_size(out)
    rows = [
        ["experts per block", spec.blocks[0].num_experts, str(per_block[0]) if len(per_block) == 1 else f"{per_block[0]}-{per_block[-1]}", ""],
        ["experts (all blocks)", total, kept, f"{kept / total - 1:+.1%}"],
        ["expert width", spec.blocks[0].experts.intermediate_size, _span(b.experts.intermediate_size for b in state.spec.blocks), ""],
        ["parameters", f"{before_size['params']:,}", f"{after_size['params']:,}", f"{after_size['params'] / before_size['params'] - 1:+.1%}"],
        ["weights on disk", human_bytes(disk_before), human_bytes(disk_after), f"{disk_after / disk_before - 1:+.1%}"],
    ]
    if before and after:
        for d in [k for k in before if k not in ("mean", "all")] + ["mean"]:
            rows.append([f"NLL {d}", f"{before[d]['nll']:.4f}", f"{after[d]['nll']:.4f}", f"{after[d]['nll'] - before[d]['nll']:+.4f}"])
    calib = state.stats.summary() if state.stats is not None else None
    title = f"moe-fx prune {args.method} ratio={args.ratio if args.ratio is not None else f'keep {args.keep}'} -> {out}"
    print(format_table(["", "before", "after", "change"], rows, title=title))
    if channel_report:
        r = channel_report
        print(f"routed-expert parameters: {r['routed_params_before']:,} -> {r['routed_params_after']:,} stored "
              f"({r['routed_params_after'] / r['routed_params_before'] - 1:+.1%}); kept channels alone: {r['routed_params_ideal']:,} "
              f"({r['routed_params_ideal'] / r['routed_params_before'] - 1:+.1%}); zero padding {r['routed_params_after'] - r['routed_params_ideal']:,}")
    compensated = state.report_of("compensate_experts")
    if compensated and compensated["mean_error_before"] is not None:  # None: no block had sampled tokens
        print(f"compensation: block output error on the calibration sample {compensated['mean_error_before']:.4f} -> "
              f"{compensated['mean_error_after']:.4f} (relative, mean over blocks)")
    distilled = state.report_of("distill", modified_only=True)
    if distilled:
        print(f"distillation: KL to the unpruned model {distilled['kl_first']:.4f} -> {distilled['kl_last']:.4f} over {distilled['steps']} steps "
              f"({distilled['trained_params']:,} parameters trained)")
    if state.search is not None:
        r = state.search
        print(f"eep search: fitness NLL {r.start_fitness:.4f} (warm start) -> {r.fitness:.4f} after {r.evaluations} plans in {r.seconds:.1f} s")
    if calib:
        print(f"calibration: {calib['tokens']:,} tokens in {calib['seconds']:.1f} s ({calib['tokens'] / max(calib['seconds'], 1e-9):,.0f} tok/s), fingerprint {calib['fingerprint']}")
    if eval_set:
        print(f"evaluation: {record['eval_source']}, {eval_set.scored_tokens:,} tokens scored")
    if args.tasks:
        limit = f", first {args.limit} items per task" if args.limit else ""
        print(format_table(*_task_rows([tasks_before, tasks_after], ["before", "after"]), title=f"zero-shot accuracy (%){limit}"))
    if stream:
        s = streamed
        gpu = f"peak GPU memory {human_bytes(s.peak_gpu_bytes)}, " if s.peak_gpu_bytes is not None else ""
        print(f"streamed {s.layers} layers ({s.resumed_layers} resumed) in {s.seconds:.1f} s: {gpu}peak CPU memory {human_bytes(s.peak_cpu_bytes)}; "
              f"largest layer {human_bytes(s.layer_weight_bytes)}, hidden states {human_bytes(s.hidden_state_bytes)}")
    return 0


def _streaming(args, source, device: str, search: bool) -> bool:
    """Whether this prune streams: ``--stream on``, or ``auto`` when the weights would not fit the device."""
    from . import distributed
    from .evaluate import disk_size

    if args.stream == "off":
        return False
    if args.stream == "auto":
        if device.startswith("cuda"):
            free = torch.cuda.mem_get_info(torch.device(device))[0]
        else:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        weights = disk_size(source)
        if not distributed.broadcast_object(weights > 0.8 * free):  # every rank takes rank 0's decision
            return False
        if distributed.is_main():
            print(f"moe-fx: the weights of {source} ({weights / 2**30:.1f} GiB) exceed 80% of the free memory of {device}: streaming layer by layer (--stream off to force in memory)")
    if search:
        raise MoeFxError("--method eep searches over the whole model at once; it cannot stream layer by layer (use --stream off on a device that holds the model)")
    return True


def _span(values) -> str:
    v = sorted(set(values))
    return str(v[0]) if len(v) == 1 else f"{v[0]}-{v[-1]}"


def _check_granularity(args, scorer, expert_scorer) -> None:
    """Options that only make sense for one granularity, and scorers of the other one, are named errors."""
    channels = args.granularity == "channel"
    allowed = ("uniform", "layer", "expert", "coverage") if channels else ("uniform", "global")
    if args.allocation not in allowed:
        raise MoeFxError(f"--allocation {args.allocation} is for {'experts' if channels else 'channels'}; with --granularity {args.granularity} use one of {', '.join(allowed)}")
    if scorer.granularity != args.granularity:
        raise MoeFxError(f"--method {args.method} scores {scorer.granularity}s; pass --granularity {scorer.granularity} or a {args.granularity} method")
    if channels and (args.merge or args.method == "eep" or args.keep is not None):
        raise MoeFxError("--granularity channel takes --ratio (fraction of channels), without --merge, --keep or --method eep")
    if channels and not 0 < args.ratio < 1:
        raise MoeFxError(f"--ratio {args.ratio}: ratio must be in (0, 1), the fraction of the routed experts' channels to remove")
    if not channels and args.expert_ratio is not None:
        raise MoeFxError("--expert-ratio is for --granularity channel (drop experts, then channels); for experts alone use --ratio")
    if expert_scorer is not None and expert_scorer.granularity != "expert":
        raise MoeFxError(f"--expert-method {args.expert_method} does not score experts; use reap, frequency, ...")


def cmd_report(args) -> int:
    from .loading import check_model_dir
    from .report import write_report

    md = write_report(check_model_dir(args.model))
    print(md.read_text())
    return 0


def _ratios(text: str) -> list[float]:
    try:
        ratios = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise MoeFxError(f"--ratios {text!r}: give a comma list of numbers in (0, 1), e.g. 0.25,0.5") from None
    if not ratios or not all(0 < r < 1 for r in ratios):
        raise MoeFxError(f"--ratios {text!r}: every ratio must be in (0, 1)")
    return ratios


def cmd_sweep(args) -> int:
    from .data import TokenBatch, pack
    from .exporters.atomic import atomic_directory
    from .exporters.checkpoint import check_output_path, save_checkpoint
    from .loading import check_model_dir, load_model, load_tokenizer
    from .passes import Calibrate
    from .passes.allocate import check_budget
    from .pipeline import state_of
    from .report.sweep_report import sweep_table, write_sweep
    from .sweep import needs_calibration, point_dir, run_sweep, sweep_scorers
    from .table import format_table
    from .zero_shot import resolve_tasks

    source = check_model_dir(args.model)
    out = check_output_path(args.out, source, args.overwrite)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    ratios = _ratios(args.ratios)
    scorers = list(sweep_scorers(methods, seed=args.seed).values())  # unknown names fail before loading
    if args.tasks:
        resolve_tasks(args.tasks, _task_dir(args))
    if needs_calibration(methods, compensate=args.compensate, seed=args.seed) and not args.calib:
        raise MoeFxError(f"--methods {args.methods}{' --compensate' if args.compensate else ''} need calibration data: pass --calib FILE")
    device = _device(args.device)
    model = load_model(source, dtype=args.dtype, device=device)
    save_dtype = model.config.dtype if isinstance(getattr(model.config, "dtype", None), torch.dtype) else next(model.parameters()).dtype
    if any(s.granularity == "expert" for s in scorers):
        for r in ratios:
            check_budget(state_of(model).spec, ratio=r)
    tokenizer = load_tokenizer(source)
    calib_docs, eval_set = _calibration_and_eval(args, tokenizer)
    show = not args.quiet
    calibration = None
    if calib_docs:
        windows = pack(tokenizer, calib_docs, seq_len=args.seq_len, max_tokens=args.calib_tokens, seed=args.seed)
        calibration = Calibrate(TokenBatch(windows, args.calib), batch_size=args.batch_size, seed=args.seed, show_progress=show)
    base = model
    zero_shot = (lambda m: _zero_shot(m, tokenizer, args, device, checkpoint=source if m is base else None)) if args.tasks else None

    with atomic_directory(out) as tmp:
        def finished(point: dict, pruned) -> None:
            if pruned is None:
                print(f"moe-fx sweep: {point['method']} {point['ratio']:.0%} failed: {point['error']}", file=sys.stderr)
                return
            if show:
                print(f"moe-fx sweep: {point['method']} {point['ratio']:.0%}: mean NLL change {point.get('nll_delta', float('nan')):+.4f}", file=sys.stderr)
            if args.save:
                save_checkpoint(pruned.to(save_dtype), point_dir(tmp, point), source=source, tokenizer=tokenizer, extra_record={"sweep_point": point})

        result = run_sweep(model, methods=methods, ratios=ratios, calibration=calibration, eval_set=eval_set, zero_shot=zero_shot,
                           compensate=args.compensate, allocation=args.allocation, seed=args.seed, batch_size=args.batch_size,
                           show_progress=show, on_point=finished)
        notes = [f"- calibration: {result.calibration['tokens']:,} tokens of {args.calib} ({result.calibration['seconds']:.1f} s, once for all points)" if result.calibration else "- no calibration",
                 f"- evaluation: {args.eval_data or f'held-out {args.holdout:.0%} of {args.calib}'}, {eval_set.scored_tokens:,} tokens scored" if eval_set else "- no NLL evaluation"]
        if args.tasks:
            notes.append(f"- zero-shot tasks: {args.tasks}" + (f", first {args.limit} items each" if args.limit else ""))
        write_sweep(tmp, result, model=str(source), notes=notes)
    print(format_table(*sweep_table(result), title=f"moe-fx sweep -> {out} (sweep.md, sweep.json, plots/)"))
    return 0


def cmd_export(args) -> int:
    from .exporters.onnx import export_onnx
    from .table import format_table, human_bytes

    result = export_onnx(args.model, args.out, with_past=args.with_past, dtype=args.dtype, opset=args.opset,
                         check=not args.no_check, device=_device(args.device), overwrite=args.overwrite)
    rows = [
        ["graph inputs", f"{len(result.inputs)} ({', '.join(result.inputs[:3])}{', past_key_values.*' if result.with_past else ''})"],
        ["weights in graph", f"{human_bytes(result.initializer_bytes)} (model parameters: {human_bytes(result.parameter_bytes)})"],
        ["files", human_bytes(result.onnx_bytes)],
        ["export time", f"{result.export_seconds:.1f} s"],
    ]
    if result.parity is not None:
        par = result.parity
        rows += [["max |logit diff|", f"{par.max_abs_logit_diff:.2e} over {par.steps_checked} steps (largest logit {par.logit_scale:.1f})"],
                 ["greedy generation", f"{par.generated_tokens} tokens, " + ("identical" if par.greedy_identical else f"differs at token {par.first_mismatch}")]]
    print(format_table(["", f"{args.model} -> {result.path}"], rows, title=f"ONNX export ({result.dtype}, onnxruntime parity checked: {result.parity is not None})"))
    return 0


COMMANDS = {"inspect": cmd_inspect, "prune": cmd_prune, "eval": cmd_eval, "export": cmd_export, "report": cmd_report, "sweep": cmd_sweep}


def _relaunch_under_torchrun(argv: list[str], nproc: int) -> int:
    """``--nproc N``: run this same command as N torchrun workers (PyTorch's launcher, not a process pool)."""
    import subprocess

    rest = [a for i, a in enumerate(argv) if a != "--nproc" and (i == 0 or argv[i - 1] != "--nproc") and not a.startswith("--nproc=")]
    return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "moe_fx", *rest])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    if getattr(args, "nproc", 1) > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return _relaunch_under_torchrun(argv, args.nproc)
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    from . import distributed
    from .environment import untested_transformers

    warning = untested_transformers()
    if warning and distributed.is_main():
        print(f"moe-fx: warning: {warning}", file=sys.stderr)
    try:
        code = COMMANDS[args.command](args)
        distributed.finish()
        return code
    except MoeFxError as exc:
        print(f"moe-fx {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moe-fx {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
