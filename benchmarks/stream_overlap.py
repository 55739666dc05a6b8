"""A streamed prune's disk work in the loop and beside it, side by side in one process (GPU).

The streamed loop reads the next layer ahead (``moe_fx.formats.read_ahead``) and writes the last layer behind
(``ShardWriter``, which also copies it off the GPU). This runs one recipe on one random-weight checkpoint four ways,
the library's behaviour toggled by patching those two helpers, the variants interleaved over ``--repeats`` rounds
and the source dropped from the page cache before every run (a cold disk):

- ``in the loop``: no read-ahead; each layer copied and written before the next one (the loop before 2026-12-07);
- ``read-ahead``: the next layer read ahead, the writes still in the loop;
- ``+ written behind, copied in the loop``: the shard written by the worker, the copy off the GPU still in the loop;
- ``+ copied behind`` (the library's default): the copy on the worker too.

Reported per variant: the loop's wall seconds a layer (median over rounds) and the mean per-layer phases.

    python benchmarks/stream_overlap.py --preset qwen3-30b-a3b --layers 8 --recipe obs-channels50-comp --work /tmp/overlap \\
        --out benchmarks/results/scale_h200/stream_overlap_h100.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
from pathlib import Path
from unittest import mock

import torch
from common import STREAM_RECIPES, streamed_recipe, synthetic_source
from scale_run import evict_page_cache
from synth_checkpoint import PRESETS

from moe_fx.evaluate.table import format_table
from moe_fx.formats.partial import ShardWriter, host_copies
from moe_fx.formats.read_ahead import ReadAhead
from moe_fx.run.streaming import stream_prune

_submit = ShardWriter.submit


def _write_in_loop(self, index, shard, tensors, record) -> None:
    _submit(self, index, shard, tensors, record)
    self.drain()


def _copy_in_loop(self, index, shard, tensors, record) -> None:
    _submit(self, index, shard, host_copies(tensors), record)


def _patches(variant: str) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    if variant == "in the loop":
        stack.enter_context(mock.patch.object(ReadAhead, "start", lambda self, keys: None))
    if variant in ("in the loop", "read-ahead"):
        stack.enter_context(mock.patch.object(ShardWriter, "submit", _write_in_loop))
    if variant == "+ written behind, copied in the loop":
        stack.enter_context(mock.patch.object(ShardWriter, "submit", _copy_in_loop))
    return stack


VARIANTS = ("in the loop", "read-ahead", "+ written behind, copied in the loop", "+ copied behind")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen3-30b-a3b", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--sequences", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--recipe", choices=sorted(STREAM_RECIPES), default="obs-channels50-comp")
    ap.add_argument("--repeats", type=int, default=2, help="rounds over the four variants")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--device", default="cuda", help="cpu: tiny shapes, a smoke test of this script")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    source, tokens = synthetic_source(args.preset, args.layers, args.work, args.device, args.sequences, args.seq_len)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for variant in VARIANTS:
            out = args.work / "out"
            evict_page_cache(source)
            with _patches(variant):
                report = stream_prune(source, out, streamed_recipe(args.recipe, tokens), device=args.device, show_progress=False,
                                      overwrite=True, report=False)
            layers = json.loads((report.out / "moe_fx.json").read_text())["streaming"]["per_layer_seconds"].values()
            phases = {k: statistics.fmean(p[k] for p in layers) for k in ("load", "forward", "passes", "write", "write_behind")}
            runs[variant].append({"seconds_per_layer": report.phase_seconds["layers"] / report.layers, "phases": phases})
            shutil.rmtree(out)
    rows, table = [], []
    for variant, done in runs.items():
        wall = statistics.median(r["seconds_per_layer"] for r in done)
        phases = {k: round(statistics.fmean(r["phases"][k] for r in done), 3) for k in done[0]["phases"]}
        rows.append({"variant": variant, "seconds_per_layer": round(wall, 3), "all_seconds_per_layer": [round(r["seconds_per_layer"], 3) for r in done],
                     "mean_phases": phases})
        table.append([variant, f"{wall:.3f}", ", ".join(f"{phases[k]:.2f}" for k in ("load", "forward", "passes", "write")), f"{phases['write_behind']:.2f}"])
    title = f"{args.preset}, {args.layers} layers, {args.recipe}, {tokens.numel():,} tokens, cold source"
    print(format_table(["variant", "s / layer (loop)", "load, forward, passes, write", "written behind"], table, title=title))
    if args.out:
        meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
                **{k: str(v) for k, v in vars(args).items()}}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
