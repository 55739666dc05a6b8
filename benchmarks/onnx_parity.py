"""ONNX export parity of pruned tiny models under the installed transformers: one row per family (per-layer
expert counts: the first MoE layer keeps half its experts), exported from the saved checkpoint with a KV cache
and checked in onnxruntime (max |logit difference| over the prompt and the cached steps, greedy generation).
Run it in each environment CI tests (the pinned transformers and the newest) to compare:

    python benchmarks/onnx_parity.py --out benchmarks/results/onnx_parity
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import tiny_model

from moe_fx import PrunePlan
from moe_fx.deliver.onnx.export import export_onnx
from moe_fx.environment import versions
from moe_fx.evaluate.table import format_table
from moe_fx.formats import save_checkpoint
from moe_fx.model.trace import trace
from moe_fx.passes import DropExperts

FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "olmoe"]


def parity_row(family: str, work: Path) -> dict:
    model = tiny_model(family).float()
    spec = trace(model)
    first = spec.blocks[0]
    DropExperts(plan=PrunePlan({first.path: list(range(0, first.num_experts, 2))}))(model)
    result = export_onnx(save_checkpoint(model, work / f"{family}-pruned"), work / f"{family}-onnx")
    par = result.parity
    return {"family": family, "max_abs_logit_diff": par.max_abs_logit_diff, "largest_logit": par.logit_scale, "steps": par.steps_checked,
            "greedy_identical": par.greedy_identical, "generated_tokens": par.generated_tokens, "export_seconds": result.export_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--out", help="directory for transformers-<version>.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [parity_row(f, Path(tmp)) for f in args.families.split(",")]
    print(format_table(["family", "max |logit diff|", "largest logit", "greedy", "export s"],
                       [[r["family"], f"{r['max_abs_logit_diff']:.2e}", f"{r['largest_logit']:.2f}",
                         f"{r['generated_tokens']} tokens " + ("identical" if r["greedy_identical"] else "DIFFER"), f"{r['export_seconds']:.1f}"] for r in rows],
                       title=f"ONNX parity, transformers {transformers.__version__} (float32, onnxruntime CPU)"))
    if args.out:
        out = Path(args.out) / f"transformers-{transformers.__version__}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"versions": versions(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
