"""What the benchmark scripts share: their data options, the held-out calibration windows and calibration."""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moe_fx import compose, state_of
from moe_fx.calibrate.data import Document, TokenBatch, pack, read_documents, split_fitness
from moe_fx.calibrate.stats import CalibrationStats
from moe_fx.evaluate.nll import EvalSet, build_eval_set, evaluate_nll, nll_sum
from moe_fx.evaluate.table import format_table
from moe_fx.formats.loading import load_model, load_tokenizer
from moe_fx.passes import Calibrate, DropExperts, PruneChannels, Score


def data_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the model, data and budget options every benchmark takes."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True, help="train-split text: calibration and held-out windows come from it")
    ap.add_argument("--valid", required=True, help="valid-split text: evaluation only")
    ap.add_argument("--calib-tokens", type=int, default=200_000)
    ap.add_argument("--holdout-tokens", "--fitness-tokens", dest="holdout_tokens", type=int, default=16384,
                    help="train tokens held out of calibration (EEP's fitness set, compensation's selection set)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", help="dtype the model is scored and pruned in")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-seqs", type=int, default=8, help="valid windows per domain")
    return ap


def experts_then_channels(ratio: float, share: float, scorer: str, options: dict | None = None, **prune) -> list:
    """Passes that remove ``ratio`` of the routed parameters in two steps: REAP drops ``share`` of each layer's experts
    (none when ``share`` is 0), then ``scorer`` (with ``options``) removes ``1 - (1 - ratio) / (1 - share)`` of the kept
    experts' channels; ``prune``: further :class:`PruneChannels` options (``allocation``, ``multiple``)."""
    experts = [Score("reap"), DropExperts(ratio=share)] if share else []
    return [*experts, Score(scorer, options=options), PruneChannels(ratio=1 - (1 - ratio) / (1 - share), **prune)]


def calibrate(base, tokens: TokenBatch, batch_size: int, observers) -> CalibrationStats:
    """Calibration statistics of ``base`` (left untouched: a copy is instrumented) with ``observers``."""
    model = compose(Calibrate(tokens, batch_size=batch_size, observers=observers, show_progress=False))(copy.deepcopy(base))
    return state_of(model).stats


def held_out_windows(tok, docs: list[Document], args) -> tuple[TokenBatch, torch.Tensor]:
    """Calibration windows and the held-out windows (the last ones), both from the train text ``docs``."""
    windows = pack(tok, docs, seq_len=args.seq_len, max_tokens=args.calib_tokens + args.holdout_tokens, seed=0)
    calib, holdout = split_fitness(windows, args.holdout_tokens)
    return TokenBatch(calib, args.calib), holdout


@dataclass
class QualityRun:
    """What a pruning-quality benchmark starts from (:func:`quality_run`)."""

    tokenizer: object
    base: nn.Module
    docs: list[Document]
    """The train-split documents the windows come from."""
    tokens: TokenBatch
    """Calibration windows (train split)."""
    holdout: torch.Tensor
    """Held-out train windows: EEP's fitness set, or where options are chosen."""
    eval_set: EvalSet
    """Valid-split windows per domain: reporting only."""
    before: dict
    """The base model's NLL per domain on ``eval_set``."""


def quality_run(args) -> QualityRun:
    """Seeded; the base model, its calibration and held-out train windows, the valid windows and its NLL on them."""
    torch.manual_seed(0)
    tok = load_tokenizer(args.model)
    base = load_model(args.model, dtype=args.dtype, device=args.device)
    docs = read_documents(args.calib)
    tokens, holdout = held_out_windows(tok, docs, args)
    eval_set = build_eval_set(args.valid, tok, seq_len=args.seq_len, seqs_per_domain=args.eval_seqs)
    return QualityRun(tok, base, docs, tokens, holdout, eval_set, evaluate_nll(base, eval_set, batch_size=args.batch_size, show_progress=False))


def mean_nll(model: nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token NLL of ``model`` over ``windows``."""
    total, count = nll_sum(model, windows, batch_size=batch_size)
    return total / count


def print_profile(title: str, run, device: str, sort_by: tuple[str, ...] = ("self_cuda_time_total",), rows: int = 14) -> None:
    """``run()`` under torch.profiler: its top operators and kernels, one table per key of ``sort_by`` (device
    time: where the GPU goes; ``self_cpu_time_total``: where the host goes)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        run()
    for key in sort_by:
        key = key if cuda else key.replace("cuda", "cpu")
        print(f"--- {title}: top by {key}")
        print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70), flush=True)


def cli_parser(description: str, recipes: dict[str, list[str]]) -> argparse.ArgumentParser:
    """The options of the benchmarks that run ``moe-fx prune`` itself (:func:`cli_prune`) for named ``recipes``."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--valid", required=True)
    ap.add_argument("--calib-tokens", type=int, default=200_000)
    ap.add_argument("--recipes", nargs="+", default=list(recipes), choices=list(recipes))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    return ap


def cli_prune(model: str, options: list[str], out: Path) -> dict:
    """``moe-fx prune MODEL OPTIONS --out OUT`` as a user runs it (a subprocess); its ``moe_fx.json`` with the
    held-out NLL change (``delta_nll``: the CLI's own ``eval_after - eval_before``, mean over domains) and the wall time."""
    cmd = [sys.executable, "-m", "moe_fx", "prune", model, *options, "--quiet", "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    record = json.loads((out / "moe_fx.json").read_text())
    record["delta_nll"] = record["eval_after"]["mean"]["nll"] - record["eval_before"]["mean"]["nll"]
    record["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return record


def expert_matrices_parser(description: str) -> argparse.ArgumentParser:
    """The options of the micro-benchmarks on random float64 expert matrices (obs elimination, compensation's refits):
    Qwen3-30B-A3B's shapes by default, timing repeats, seed, device and the JSON to write."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True)
    return ap


def timed_candidates(candidates: dict, args, key: str) -> tuple[list[dict], dict]:
    """Each of ``candidates`` (label -> ``fn()``) timed by :func:`median_run`, in order: rows of ``{key: label,
    "seconds", "all_seconds"}`` and each label's result."""
    rows, results = [], {}
    for label, fn in candidates.items():
        median, seconds, results[label] = median_run(fn, args.repeats, args.device)
        rows.append({key: label, "seconds": median, "all_seconds": seconds})
    return rows, results


def report_timings(args, rows: list[dict], key: str, column: str, title: str, **result) -> None:
    """Print ``rows`` (:func:`timed_candidates`) with each one's speed-up against the first, and write them, the
    run's options and ``result`` to ``args.out``."""
    table = [[str(r[key]), f"{r['seconds']:.3f}", f"{rows[0]['seconds'] / r['seconds']:.2f}x"] for r in rows]
    print(format_table([column, "s (median)", "speed-up"], table, title=title))
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__, **vars(args)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, **result}, indent=1) + "\n")


def median_run(fn, repeats: int, device: str) -> tuple[float, list[float], object]:
    """``fn()`` run ``repeats + 1`` times (the first warms up: cuBLAS, cuSOLVER, the allocator), waiting for the
    GPU after each: the median seconds of the timed runs, every run's seconds and the last run's result."""
    seconds, out = [], None
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    timed = sorted(seconds[1:])
    return timed[len(timed) // 2], seconds, out


STREAM_RECIPES = {"reap50-comp": "reap", "obs-channels50-comp": "obs"}
"""Streamed recipes of the profiling benchmarks -> their scorer: half of the experts by REAP, or half of every
expert's channels by obs, each with compensation (``scale_run.py``'s recipes of the same names, as passes)."""


def streamed_recipe(recipe: str, tokens: torch.Tensor) -> list:
    """The passes of ``recipe`` (:data:`STREAM_RECIPES`) calibrating on ``tokens`` in batches of 4, as the CLI builds them."""
    from moe_fx.run.recipe import observers_for, prune_passes
    from moe_fx.score.base import get_scorer

    scorer = get_scorer(STREAM_RECIPES[recipe])
    calibrate = Calibrate(tokens, batch_size=4, observers=observers_for([scorer], compensate=True), show_progress=False)
    return [calibrate, *prune_passes(scorer, None, ratio=0.5, compensate=True)]


def synthetic_source(preset: str, layers: int, work: Path, device: str, sequences: int, seq_len: int) -> tuple[Path, torch.Tensor]:
    """A random-weight checkpoint of ``synth_checkpoint.py``'s ``preset`` in ``work`` (written once; tiny shapes on a
    CPU, a smoke test) and seeded random calibration tokens ``[sequences, seq_len]`` (``[8, 128]`` on a CPU)."""
    from synth_checkpoint import write_checkpoint

    tiny = device == "cpu"
    source = work / f"{preset}-src"
    if not source.exists():
        write_checkpoint(preset, source, layers=layers, tiny=tiny, device=device, quiet=True,
                         tokenizer=Path(__file__).resolve().parents[1] / "examples" / "assets" / "qwen3moe-micro")
    shape = (8, 128) if tiny else (sequences, seq_len)
    return source, torch.randint(3, 8000, shape, generator=torch.Generator().manual_seed(0))
