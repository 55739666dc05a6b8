"""``moe-fx sweep``: prune at several methods x ratios from one calibration; table, JSON and quality-vs-ratio plots."""

from __future__ import annotations

import sys

import torch

from moe_fx.cli.common import add_common, add_data, add_eval, calibration_and_eval, resolve_device, task_dir, zero_shot_results
from moe_fx.errors import MoeFxError


def add_parser(sub) -> None:
    """Declare the command and its options on the ``moe-fx`` subparsers ``sub``."""
    p = sub.add_parser("sweep", help="prune at several methods x ratios from one calibration; table, JSON and quality-vs-ratio plots")
    p.add_argument("model", help="source checkpoint directory (never modified)")
    p.add_argument("--methods", default="random,frequency,reap",
                   help="comma list of scoring methods (reap, frequency, random, shape, naee, merge-<method>; channel methods "
                        "fisher, heapr, obs, coverage, activation, weight); default random,frequency,reap")
    p.add_argument("--ratios", default="0.25,0.5", help="comma list of fractions to prune, each in (0, 1) (default 0.25,0.5)")
    p.add_argument("--allocation", default="uniform", help="allocation for every point (uniform, global; channel: layer, expert, coverage)")
    p.add_argument("--compensate", action="store_true", help="refit kept experts after every rewrite")
    p.add_argument("--save", action="store_true", help="also save each pruned checkpoint under OUT/checkpoints/<method>-<percent>")
    add_data(p)
    add_eval(p)
    add_common(p)


def _ratios(text: str) -> list[float]:
    try:
        ratios = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise MoeFxError(f"--ratios {text!r}: give a comma list of numbers in (0, 1), e.g. 0.25,0.5") from None
    if not ratios or not all(0 < r < 1 for r in ratios):
        raise MoeFxError(f"--ratios {text!r}: every ratio must be in (0, 1)")
    return ratios


def run(args) -> int:
    """Run the command with the parsed ``args``; return the exit status."""
    from moe_fx.calibrate.data import TokenBatch, pack
    from moe_fx.evaluate.report.sweep_report import sweep_table, write_sweep
    from moe_fx.evaluate.table import format_table
    from moe_fx.evaluate.zero_shot import resolve_tasks
    from moe_fx.formats.atomic import atomic_directory
    from moe_fx.formats.checkpoint import check_output_path, save_checkpoint
    from moe_fx.formats.loading import check_model_dir, load_model, load_tokenizer
    from moe_fx.passes import Calibrate
    from moe_fx.pipeline import state_of
    from moe_fx.plan.allocate import check_budget
    from moe_fx.run.sweep import needs_calibration, point_dir, run_sweep, sweep_scorers

    source = check_model_dir(args.model)
    out = check_output_path(args.out, source, args.overwrite)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    ratios = _ratios(args.ratios)
    scorers = list(sweep_scorers(methods, seed=args.seed).values())  # unknown names fail before loading
    if args.tasks:
        resolve_tasks(args.tasks, task_dir(args))
    if needs_calibration(methods, compensate=args.compensate, seed=args.seed) and not args.calib:
        raise MoeFxError(f"--methods {args.methods}{' --compensate' if args.compensate else ''} need calibration data: pass --calib FILE")
    device = resolve_device(args.device)
    model = load_model(source, dtype=args.dtype, device=device, quantize=None, ragged=False)  # dense: the passes rewrite weights
    save_dtype = model.config.dtype if isinstance(getattr(model.config, "dtype", None), torch.dtype) else next(model.parameters()).dtype
    if any(s.granularity == "expert" for s in scorers):
        for r in ratios:
            check_budget(state_of(model).spec, ratio=r)
    tokenizer = load_tokenizer(source)
    calib_docs, eval_set = calibration_and_eval(args, tokenizer)
    show = not args.quiet
    calibration = None
    if calib_docs:
        windows = pack(tokenizer, calib_docs, seq_len=args.seq_len, max_tokens=args.calib_tokens, seed=args.seed)
        calibration = Calibrate(TokenBatch(windows, args.calib), batch_size=args.batch_size, seed=args.seed, show_progress=show)
    base = model
    zero_shot = (lambda m: zero_shot_results(m, tokenizer, args, device, checkpoint=source if m is base else None)) if args.tasks else None

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
