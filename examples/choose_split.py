"""Several recipes for one budget, the one whose pruned model predicts held-out calibration text best kept.

    python examples/choose_split.py [MODEL_DIR] [OUT_DIR]

A quarter of the routed experts' parameters can go as whole experts, as channels inside every expert, or half and
half; which is best depends on the model. One calibration records what all three read; ChooseRecipe runs each on
a view of the model that shares its tensors, measures the NLL on windows the calibration never saw, and prunes the
model with the best one. What `moe-fx prune --preset best-oneshot-params` does in memory. Defaults to the trained
micro MoE and the calibration text in examples/assets.
"""

import sys
from pathlib import Path

import moe_fx
from moe_fx.calibrate.data import pack, read_documents, split_fitness
from moe_fx.evaluate import build_eval_set, evaluate_nll
from moe_fx.formats import save_checkpoint
from moe_fx.formats.loading import load_tokenizer
from moe_fx.passes import Calibrate, ChooseRecipe, CompensateExperts, DropExperts, PruneChannels, Score

ASSETS = Path(__file__).parent / "assets"
source = Path(sys.argv[1]) if len(sys.argv) > 1 else ASSETS / "qwen3moe-micro"
out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("out/example-choose")

tokenizer = load_tokenizer(source)
model = moe_fx.load(source, dtype="float32")
eval_set = build_eval_set(ASSETS / "valid.jsonl.gz", tokenizer, seq_len=256, seqs_per_domain=2)
windows = pack(tokenizer, read_documents(ASSETS / "calib.jsonl.gz"), seq_len=256, max_tokens=12_000, seed=0)
windows, fitness = split_fitness(windows, 2048)  # held out of calibration: what the recipes are judged on
before = evaluate_nll(model, eval_set, show_progress=False)["mean"]["nll"]

model = moe_fx.compose(
    Calibrate(windows, observers=("routing", "reap", "inputs"), show_progress=False),  # REAP's and obs's statistics, compensation's sample
    ChooseRecipe({
        "experts": (Score("reap"), DropExperts(ratio=0.25), CompensateExperts()),
        "channels": (Score("obs"), PruneChannels(ratio=0.25, multiple=8), CompensateExperts()),
        "half and half": (Score("reap"), DropExperts(ratio=0.125), Score("obs"), PruneChannels(ratio=1 / 7, multiple=8), CompensateExperts()),
    }, data=fitness, show_progress=False),
)(model)

choice = moe_fx.state_of(model).report_of("choose_recipe")
for label, nll in choice["fitness"].items():
    print(f"{label:14s} held-out calibration NLL {nll:.4f}{'  <- kept' if label == choice['chosen'] else ''}")
after = evaluate_nll(model, eval_set, show_progress=False)["mean"]["nll"]
print(f"valid NLL {before:.4f} -> {after:.4f} ({after - before:+.4f}) with '{choice['chosen']}'")
print(f"saved to {save_checkpoint(model, out, source=source, tokenizer=tokenizer, overwrite=True)}")
