"""Prune a MoE model in a few lines: REAP scores, a quarter of the experts dropped, the kept experts refit to
the original layer outputs, saved as a checkpoint stock transformers loads.

    python examples/prune.py [MODEL_DIR] [OUT_DIR]

Defaults to the trained micro MoE and calibration text shipped in examples/assets. The command line does
the same: moe-fx prune MODEL_DIR --method reap --ratio 0.25 --compensate --calib TEXT --out OUT_DIR
"""

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import moe_fx
from moe_fx.formats import save_checkpoint
from moe_fx.kernels.implementation import set_implementation
from moe_fx.passes import Calibrate, CompensateExperts, DropExperts, Score

ASSETS = Path(__file__).parent / "assets"
source = Path(sys.argv[1]) if len(sys.argv) > 1 else ASSETS / "qwen3moe-micro"
out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("out/example-prune")

model = moe_fx.load(source)  # from_pretrained, with moe-fx's experts kernels and clear errors
pruned = moe_fx.compose(
    # one pass over the calibration text records what REAP scores and what compensation refits on
    Calibrate(ASSETS / "calib.jsonl.gz", max_tokens=20_000, seq_len=256, observers=("routing", "reap", "inputs")),
    Score("reap"),                 # router weight x expert output norm, per expert
    DropExperts(ratio=0.25),       # the same count in every layer: a stock config
    CompensateExperts(),           # least-squares refit of the kept experts' down projections
)(model)
save_checkpoint(pruned, out, source=source, overwrite=True)  # weights, config, tokenizer, moe_fx.json, report.md

# the saved checkpoint is a plain transformers one
reloaded = AutoModelForCausalLM.from_pretrained(out)
set_implementation(reloaded, "moe_fx")  # compare like with like: the kernels the pruned model ran with
ids = torch.randint(3, 8000, (1, 16), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    same = torch.equal(pruned(ids).logits, reloaded(ids).logits)
print(f"experts per layer: {[len(k) for k in moe_fx.state_of(pruned).plan.kept_experts.values()]}")
print(f"saved to {out}; reloaded with AutoModelForCausalLM, identical logits: {same}")
