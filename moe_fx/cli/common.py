"""What the commands share: device and dtype options, calibration/evaluation data options and their loading,
zero-shot task options and tables."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from moe_fx.errors import MoeFxError


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MoeFxError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return name


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto (checkpoint's), float32, bfloat16, float16")
    add_output(p)


def add_output(p: argparse.ArgumentParser) -> None:
    """``--quiet`` (no progress bars) and ``--verbose`` (the libraries' own warnings and info)."""
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true", help="show transformers' and torch's warnings and info messages (hidden by default)")


def add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-seqs", type=int, default=8, help="evaluation windows per domain (default 8)")
    p.add_argument("--eval-seq-len", type=int, default=512, help="evaluation window length in tokens (default 512)")
    p.add_argument("--eval-stride", type=int, help="sliding-window perplexity: windows start this many tokens apart, each token is "
                   "scored once with up to seq-len - stride tokens of extra context (default: seq-len, no overlap)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")


def add_tasks(p: argparse.ArgumentParser, *, tasks_flag: str = "--tasks", limit_flag: str = "--limit") -> None:
    g = p.add_argument_group("zero-shot tasks (lm-eval's prompts and metrics, offline)")
    g.add_argument(tasks_flag, dest="tasks", help="comma list of blimp, lambada_openai, hellaswag, piqa, arc_easy, arc_challenge, copa, "
                   "winogrande, boolq, openbookqa, blimp_<paradigm>; 'default' (those that separate small models) or 'all'")
    g.add_argument(limit_flag, dest="limit", type=int, help="first N items of each task (of each BLiMP paradigm)")
    g.add_argument("--task-data", default=os.environ.get("MOE_FX_EVAL_DATA"),
                   help="directory of the task files (llm_foundry/, blimp/, hellaswag/ as in shared/data/eval; default $MOE_FX_EVAL_DATA)")
    g.add_argument("--no-cache", action="store_true", help="score every request again (default: reuse a checkpoint's cached log-likelihoods)")


def add_generation(p: argparse.ArgumentParser, flag: str = "--generate") -> None:
    """Generation agreement options (greedy continuations against the reference model's)."""
    g = p.add_argument_group("generation agreement (greedy continuations against the unpruned / first model)")
    g.add_argument(flag, dest="generate", type=int, default=0, metavar="PROMPTS",
                   help="held-out prompts to continue greedily and compare (default 0: off); needs evaluation text")
    g.add_argument("--generate-tokens", type=int, default=32, help="new tokens per prompt (default 32)")
    g.add_argument("--prompt-len", type=int, default=64, help="prompt length in tokens (default 64)")


def generation_rows(results: list[dict], names: list[str]) -> tuple[list[str], list[list]]:
    """The generation-agreement table: a row per compared model."""
    headers = ["model", "all tokens identical", "mean agreeing prefix", "tokens identical", "mean KL"]
    return headers, [[n, f"{100 * r['exact_match']:.1f}%", f"{r['prefix_tokens']:.1f} of {r['new_tokens']}", f"{100 * r['token_match']:.1f}%",
                      f"{r['kl']:.4f}"] for n, r in zip(names, results)]


def add_data(p: argparse.ArgumentParser) -> None:
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
    add_tasks(p, tasks_flag="--eval-tasks", limit_flag="--task-limit")


def eval_rows(results: list[dict], names: list[str]) -> tuple[list[str], list[list]]:
    domains = [d for d in results[0] if d not in ("mean", "all")] + ["mean", "all"]
    headers = ["domain"] + [f"NLL {n}" for n in names] + [f"PPL {n}" for n in names] + [f"delta {n}" for n in names[1:]]
    rows = []
    for d in domains:
        vals = [r[d]["nll"] for r in results]
        rows.append([d] + [f"{v:.4f}" for v in vals] + [f"{r[d]['ppl']:.2f}" for r in results] + [f"{v - vals[0]:+.4f}" for v in vals[1:]])
    return headers, rows


def task_rows(results: list[dict], names: list[str]) -> tuple[list[str], list[list]]:
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


def task_dir(args) -> str:
    if not args.task_data:
        raise MoeFxError("zero-shot tasks need their files: pass --task-data DIR (the layout of shared/data/eval: llm_foundry/, "
                         "blimp/, hellaswag/) or set MOE_FX_EVAL_DATA")
    return args.task_data


def zero_shot_results(model, tokenizer, args, device: str, checkpoint: str | Path | None = None) -> dict:
    """Zero-shot results of ``model``; cached per checkpoint (a model read from disk unchanged) unless --no-cache."""
    from moe_fx.evaluate.zero_shot import LoglikCache, evaluate_tasks
    from moe_fx.evaluate.zero_shot.loglik import max_length_of

    cache = None
    if checkpoint is not None and not args.no_cache:
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        cache = LoglikCache.for_checkpoint(checkpoint, dtype=dtype, device=device, max_length=max_length_of(model))
    return evaluate_tasks(model, tokenizer, args.tasks, data_dir=task_dir(args), limit=args.limit, batch_tokens=args.batch_size * args.eval_seq_len,
                          cache=cache, show_progress=not args.quiet)


def calibration_and_eval(args, tokenizer) -> tuple[list, object]:
    """Calibration documents and the evaluation set (``--eval-data``, else a held-out share of ``--calib``;
    none with ``--no-eval``, or on ranks other than the first, which only help calibrate)."""
    from moe_fx.calibrate import distributed
    from moe_fx.calibrate.data import read_documents, split_holdout
    from moe_fx.evaluate.nll import build_eval_set

    calib_docs, eval_docs = (read_documents(args.calib), None) if args.calib else ([], None)
    if args.eval_data:
        eval_docs = read_documents(args.eval_data)
    elif calib_docs and not args.no_eval:
        calib_docs, eval_docs = split_holdout(calib_docs, args.holdout, args.seed)
    if not eval_docs or args.no_eval or not distributed.is_main():
        return calib_docs, None
    return calib_docs, build_eval_set(eval_docs, tokenizer, seq_len=args.eval_seq_len, seqs_per_domain=args.eval_seqs, stride=args.eval_stride)


def check_language_model(meta, source, needs: dict[str, bool]) -> None:
    """Refuse, before loading, what needs next-token logits (``needs``: what -> whether this run does it) on a model
    that does not predict next tokens (a token classifier, a bare backbone); ``meta``: the model's structure."""
    if meta.can_generate():
        return
    asked = [what for what, on in needs.items() if on]
    if asked:
        raise MoeFxError(f"{source}: {type(meta).__name__} is not a causal language model, so {' and '.join(asked)} cannot run on it")


def check_token_ids(meta, source, *windows: torch.Tensor) -> None:
    """Refuse data whose token ids the model has no embedding for (a tokenizer that is not the model's)."""
    rows = meta.get_input_embeddings().num_embeddings
    largest = max((int(w.max()) for w in windows if w.numel()), default=-1)
    if largest >= rows:
        raise MoeFxError(f"{source}: the tokenizer gives token id {largest}, but the model embeds {rows} tokens: the tokenizer is not this "
                         "model's (put the model's own tokenizer files in the checkpoint directory)")


def span(values) -> str:
    v = sorted(set(values))
    return str(v[0]) if len(v) == 1 else f"{v[0]}-{v[-1]}"
