"""The one-shot presets against plain REAP at the same budgets, through the CLI, on any trained model: the check that a
recipe chosen on qwen3moe-bench holds on other families (issue 25; ``train_tiny_moe.py`` trains some).

    python benchmarks/preset_vs_reap.py --model /tmp/trained/mixtral-micro --calib ../shared/data/corpus/train.jsonl.gz \\
        --valid ../shared/data/corpus/valid.jsonl.gz --out benchmarks/results/preset_vs_reap_mixtral_micro_cpu.json

For each ``--ratios`` R: ``--method reap --ratio R`` (the reference), ``--method reap --ratio R --compensate`` and
``--preset best-oneshot-params --ratio R`` (R of the routed experts' parameters: experts, then channels, then
compensation, the split kept of those it tries in memory recorded with each one's held-out fitness), in memory, with the same calibration tokens and the valid split. Each row: the held-out NLL change
(the CLI's own evaluation), the share of routed-expert parameters removed (experts x width, from the record), the
ratio to REAP's change at that R, and compensation's relative block error on its sample after the refit. The recipes
``reap+comp65k`` and ``obs-channels+comp65k`` spend the whole budget as experts or as channels with the preset's
compensation sample: the two ends of the split. ``best-oneshot-params-streamed`` is the preset streamed one layer at a time
(``--stream on``: each split streamed to its own output, with ``--sequential``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from common import cli_parser, cli_prune

from moe_fx.evaluate.table import format_table

RECIPES = {
    "reap": ["--method", "reap"],
    "reap+comp": ["--method", "reap", "--compensate"],
    "best-oneshot-params": ["--preset", "best-oneshot-params"],
    # streamed layer by layer (each split streamed to its own output and measured there; --sequential, the streamed default)
    "best-oneshot-params-streamed": ["--preset", "best-oneshot-params", "--stream", "on"],
    # twice the preset's compensation sample (which obs also scores channels on)
    "best-oneshot-params-131k": ["--preset", "best-oneshot-params", "--compensate-samples", "131072"],
    # the preset's two ends: its compensation sample, all of the budget as experts or as channels
    "reap+comp65k": ["--method", "reap", "--compensate", "--compensate-samples", "65536"],
    "obs-channels+comp65k": ["--granularity", "channel", "--method", "obs", "--compensate", "--compensate-samples", "65536"],
    # channels alone with per-expert widths, at most 4 a layer, stored in width buckets (one of the preset's candidates in memory)
    "obs-buckets+comp65k": ["--granularity", "channel", "--method", "obs", "--allocation", "buckets", "--compensate", "--compensate-samples", "65536"],
    # the same with each layer removing its own share (what the streamed preset's fourth candidate plans), in memory
    "obs-buckets-per-layer+comp65k": ["--granularity", "channel", "--method", "obs", "--allocation", "buckets-per-layer", "--compensate",
                                      "--compensate-samples", "65536"],
}


def routed_removed(record: dict) -> float:
    """Share of the routed experts' parameters removed as stored: each block's experts x width, after against before,
    and for experts stored in width buckets their stored parameters against the padded ones."""
    size = lambda experts, widths: sum(experts[b] * widths[b] for b in experts)
    kept = size(record["experts_after"], record["widths_after"]) / size(record["experts_before"], record["widths_before"])
    storage = record.get("expert_storage")
    return 1 - kept * (storage["routed_params_stored"] / storage["routed_params_padded"] if storage else 1)


def run_recipe(args, recipe: str, ratio: float, out: Path) -> dict:
    """One row: ``recipe`` at ``ratio`` through the CLI, or the CLI's one-line refusal (a budget the model's widths
    cannot take: a row that says so rather than an aborted table)."""
    try:
        record = cli_prune(args.model, [*RECIPES[recipe], "--ratio", str(ratio), "--calib", args.calib, "--calib-tokens",
                                        str(args.calib_tokens), "--eval-data", args.valid, "--device", args.device], out)
    except SystemExit as refusal:
        return {"ratio": ratio, "recipe": recipe, "refused": str(refusal).strip().splitlines()[-1]}
    refit = [p["report"] for p in record["passes"] if p["name"] == "compensate_experts"]
    choice = next((p["report"] for p in record["passes"] if p["name"] == "choose_recipe"), None)
    delta = record["delta_nll"]
    return {"ratio": ratio, "recipe": recipe, "delta_nll": round(delta, 5),
            "block_error_after_compensation": refit[-1]["mean_error_after"] if refit else None,
            "routed_removed": round(routed_removed(record), 4),
            "nll_before": record["eval_before"]["mean"]["nll"], "seconds": record["wall_seconds"],
            "split_kept": choice and choice["chosen"], "split_fitness": choice and choice["fitness"],
            "experts_after": record["experts_after"], "widths_after": record["widths_after"], "options": record["cli"]}


def main() -> None:
    ap = cli_parser(__doc__.splitlines()[0], RECIPES)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for ratio in args.ratios:
            reference = None
            for recipe in ["reap", *(r for r in args.recipes if r != "reap")]:
                row = run_recipe(args, recipe, ratio, Path(work) / f"{recipe}-{ratio}")
                reference = row.get("delta_nll") if recipe == "reap" else reference
                if "delta_nll" in row:  # against REAP's loss at this ratio (None where REAP was refused or lost nothing)
                    row["x_reap"] = round(row["delta_nll"] / reference, 4) if reference else None
                rows.append(row)
                print(f"{ratio} {recipe}: " + (f"{row['delta_nll']:+.4f}" if "delta_nll" in row else f"refused: {row['refused']}"), flush=True)
                Path(args.out).write_text(json.dumps({"options": vars(args), "rows": rows}, indent=1) + "\n")  # kept if a later row is cut off
    print(format_table(["ratio", "recipe", "routed removed", "Δ NLL", "x REAP", "block error", "split kept", "seconds"],
                       [[r["ratio"], r["recipe"], f"{r['routed_removed']:.1%}", f"{r['delta_nll']:+.4f}", r["x_reap"],
                         r["block_error_after_compensation"], r["split_kept"] or "", r["seconds"]] if "delta_nll" in r else
                        [r["ratio"], r["recipe"], "", "refused", "", "", r["refused"][:60], ""] for r in rows]))
    Path(args.out).write_text(json.dumps({"options": vars(args), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
