"""Streamed prunes with and without ``--sequential``, side by side on the same calibration and held-out text.

A plain streamed prune calibrates every layer on the hidden states of the *unpruned* layers before it; with
``--sequential`` each rewritten layer runs again, so the next layer is calibrated, scored and compensated on what the
pruned model feeds it. This runs ``moe-fx prune --stream on`` for each recipe twice (the same seed, data and
options but that flag) and reports the held-out NLL increase of each and their ratio. The CLI's own evaluation is
what is compared (``eval_before`` / ``eval_after`` of each run's ``moe_fx.json``).

    python benchmarks/sequential_streaming.py --model ../shared/models/qwen3moe-bench \\
        --calib ../shared/data/corpus/train.jsonl.gz --valid ../shared/data/corpus/valid.jsonl.gz \\
        --out benchmarks/results/sequential_streaming_bench_cpu.json
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from common import cli_parser, cli_prune

from moe_fx.evaluate.table import format_table

RECIPES = {
    "preset-params25": ["--preset", "best-oneshot-params", "--ratio", "0.25"],
    "preset-params50": ["--preset", "best-oneshot-params", "--ratio", "0.5"],
    "reap25-comp": ["--method", "reap", "--ratio", "0.25", "--compensate", "--compensate-samples", "65536"],
}
"""Recipe name -> ``moe-fx prune`` options (streaming and the data options are added)."""


def run(args, recipe: str, sequential: bool, work: Path) -> dict:
    out = work / f"{recipe}{'-sequential' if sequential else ''}"
    record = cli_prune(args.model, [*RECIPES[recipe], "--stream", "on", "--sequential" if sequential else "--no-sequential", "--calib",
                                    args.calib, "--calib-tokens", str(args.calib_tokens), "--eval-data", args.valid, "--device", args.device], out)
    return {"recipe": recipe, "sequential": sequential, "delta_nll": round(record["delta_nll"], 5), "nll_before": record["eval_before"]["mean"]["nll"],
            "nll_after": record["eval_after"]["mean"]["nll"], "seconds": record["wall_seconds"], "stream_seconds": record["streaming"]["seconds"],
            "options": record["cli"]}


def main() -> None:
    ap = cli_parser(__doc__.splitlines()[0], RECIPES)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for recipe in args.recipes:
            plain, seq = (run(args, recipe, s, Path(work)) for s in (False, True))
            rows += [plain, seq | {"vs_plain": round(seq["delta_nll"] / plain["delta_nll"], 4)}]
            print(f"{recipe}: plain {plain['delta_nll']:+.4f}, sequential {seq['delta_nll']:+.4f}", flush=True)
    print(format_table(["recipe", "sequential", "Δ NLL", "x plain", "seconds"],
                       [[r["recipe"], r["sequential"], f"{r['delta_nll']:+.4f}", r.get("vs_plain", ""), r["seconds"]] for r in rows]))
    Path(args.out).write_text(json.dumps({"options": vars(args), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
