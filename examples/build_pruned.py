"""A model-build script that composes moe-fx passes (the Python form of `moe-fx prune`).

    python examples/build_pruned.py [MODEL_DIR] [OUT_DIR]

Defaults to the trained micro MoE and calibration text shipped in examples/assets.
"""

import sys
from pathlib import Path

from moe_fx import compose, state_of
from moe_fx.evaluate import build_eval_set, evaluate_nll
from moe_fx.exporters import save_checkpoint
from moe_fx.loading import load_model, load_tokenizer
from moe_fx.passes import Calibrate, DropExperts, Score

ASSETS = Path(__file__).parent / "assets"
source = Path(sys.argv[1]) if len(sys.argv) > 1 else ASSETS / "qwen3moe-micro"
out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("out/example-reap25")

tokenizer = load_tokenizer(source)
model = load_model(source)
eval_set = build_eval_set(ASSETS / "valid.jsonl.gz", tokenizer, seq_len=256, seqs_per_domain=4)
before = evaluate_nll(model, eval_set)["mean"]["nll"]

pipeline = compose(
    Calibrate(ASSETS / "calib.jsonl.gz", tokenizer=tokenizer, max_tokens=50_000, seq_len=256),
    Score("reap"),
    DropExperts(ratio=0.25),
)
model = pipeline(model)

after = evaluate_nll(model, eval_set)["mean"]["nll"]
state = state_of(model)
print(f"kept experts: {state.plan.kept_experts}")
print(f"held-out NLL: {before:.4f} -> {after:.4f} ({after - before:+.4f})")
print(f"saved to {save_checkpoint(model, out, source=source, tokenizer=tokenizer, overwrite=True)}")
