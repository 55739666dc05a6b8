"""``moe-fx eval``: per-domain NLL / perplexity and zero-shot accuracy of one or more checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

from moe_fx.cli.common import (
    add_common,
    add_eval,
    add_generation,
    add_tasks,
    check_language_model,
    check_token_ids,
    eval_rows,
    generation_rows,
    resolve_device,
    task_dir,
    task_rows,
    zero_shot_results,
)
from moe_fx.errors import MoeFxError
from moe_fx.kernels.quantized import SCHEMES


def add_parser(sub) -> None:
    """Declare the command and its options on the ``moe-fx`` subparsers ``sub``."""
    p = sub.add_parser("eval", help="per-domain NLL / perplexity and zero-shot task accuracy of one or more checkpoints")
    p.add_argument("models", nargs="+", help="checkpoint directories; with several, deltas are shown against the first")
    p.add_argument("--data", help=".jsonl(.gz) with 'text' (and 'domain') fields, or .txt (WikiText-2's valid.txt, say)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--quantize", choices=SCHEMES, metavar="SCHEME",
                   help=f"quantize the routed experts of every model but the first (the reference) in memory: {', '.join(SCHEMES)}; "
                        "list one checkpoint twice to see what quantizing alone costs")
    add_eval(p)
    add_tasks(p)
    add_generation(p)
    add_common(p)


def run(args) -> int:
    """Run the command with the parsed ``args``; return the exit status."""
    from moe_fx.evaluate.generation import agreement, generation_prompts, reference
    from moe_fx.evaluate.nll import build_eval_set, evaluate_nll
    from moe_fx.evaluate.table import format_table
    from moe_fx.evaluate.zero_shot import resolve_tasks
    from moe_fx.formats.lazy import meta_model
    from moe_fx.formats.loading import load_model, load_tokenizer

    if not args.data and not args.tasks:
        raise MoeFxError("nothing to evaluate: give --data FILE (NLL / perplexity) and/or --tasks NAMES (zero-shot accuracy)")
    if args.generate and (not args.data or len(args.models) < 2):
        raise MoeFxError("--generate compares greedy continuations of --data prompts against the first model: give --data and two or more models")
    if args.tasks:
        resolve_tasks(args.tasks, task_dir(args))  # bad names or files fail before any model loads
    device = resolve_device(args.device)
    tokenizer = load_tokenizer(args.models[0])
    eval_set = build_eval_set(args.data, tokenizer, seq_len=args.eval_seq_len, seqs_per_domain=args.eval_seqs, stride=args.eval_stride) if args.data else None
    prompts = generation_prompts(eval_set, prompts=args.generate, prompt_len=args.prompt_len) if args.generate else None
    for path in args.models:  # every model's structure, before the first one loads
        meta = meta_model(path, args.dtype, device)
        check_language_model(meta, path, {"NLL evaluation": eval_set is not None, "--tasks": bool(args.tasks)})
        check_token_ids(meta, path, *(eval_set.windows.values() if eval_set else ()))
    results, ref = [], None
    for i, path in enumerate(args.models):
        model = load_model(path, dtype=args.dtype, device=device, **({"quantize": args.quantize} if args.quantize and i else {}))
        entry = {}
        if eval_set:
            entry["nll"] = evaluate_nll(model, eval_set, batch_size=args.batch_size, show_progress=not args.quiet)
        if args.tasks:
            entry["tasks"] = zero_shot_results(model, tokenizer, args, device, checkpoint=path)
        if prompts is not None and ref is None:  # the first model is the reference
            ref = reference(model, prompts, args.generate_tokens, batch_size=args.batch_size, show_progress=not args.quiet)
        elif prompts is not None:
            entry["generation"] = agreement(model, ref, batch_size=args.batch_size, show_progress=not args.quiet)
        results.append(entry)
        del model
    labels = [m + (f" + {args.quantize}" if args.quantize and i else "") for i, m in enumerate(args.models)]
    names = [Path(m).name for m in labels]
    if eval_set:
        print(format_table(*eval_rows([r["nll"] for r in results], names), title=f"next-token NLL on {args.data} ({eval_set.scored_tokens:,} tokens scored)"))
    if args.tasks:
        limit = f", first {args.limit} items per task" if args.limit else ""
        print(format_table(*task_rows([r["tasks"] for r in results], names), title=f"zero-shot accuracy (%){limit}"))
    if prompts is not None:
        print(format_table(*generation_rows([r["generation"] for r in results[1:]], names[1:]),
                           title=f"greedy continuations against {names[0]}: {args.generate} prompts of {args.prompt_len} tokens, {args.generate_tokens} new tokens"))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(zip(labels, results)), indent=2) + "\n")
    return 0
