"""A model-build script: passes composed by hand, the way a build system would, with evaluation between steps.

    python examples/build_pruned.py [MODEL_DIR] [OUT_DIR]

One calibration pass records everything the later passes read; an evolutionary search (EEP) picks which
experts each layer keeps, measuring every candidate after compensation; then a third of the kept experts'
channels go (Fisher scores), the experts are refit, and a short distillation towards the unpruned model repairs
what is left. Defaults to the trained micro MoE and the calibration text in examples/assets.
"""

import sys
from pathlib import Path

import moe_fx
from moe_fx.calibrate.data import pack, read_documents, split_fitness
from moe_fx.evaluate import build_eval_set, evaluate_nll, model_size
from moe_fx.formats import save_checkpoint
from moe_fx.formats.loading import load_tokenizer
from moe_fx.passes import Calibrate, CompensateExperts, Distill, DropExperts, EvolutionarySearch, PruneChannels, Score

ASSETS = Path(__file__).parent / "assets"
source = Path(sys.argv[1]) if len(sys.argv) > 1 else ASSETS / "qwen3moe-micro"
out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("out/example-build")

tokenizer = load_tokenizer(source)
model = moe_fx.load(source, dtype="float32")
eval_set = build_eval_set(ASSETS / "valid.jsonl.gz", tokenizer, seq_len=256, seqs_per_domain=2)
windows = pack(tokenizer, read_documents(ASSETS / "calib.jsonl.gz"), seq_len=256, max_tokens=20_000, seed=0)
windows, fitness = split_fitness(windows, 2048)  # held out of calibration: the search's fitness tokens


def report(step: str, m) -> None:
    print(f"{step:28s} mean NLL {evaluate_nll(m, eval_set, show_progress=False)['mean']['nll']:.4f}, {model_size(m)['params']:,} parameters")


report("source", model)
model = moe_fx.compose(
    # routing/REAP statistics, channel activations and gradients (Fisher), and the sample compensation refits on
    Calibrate(windows, observers=("routing", "reap", "channels", "channel_grads", "inputs"), show_progress=False),
    Score("reap"),
    DropExperts(ratio=0.25, allocation=EvolutionarySearch(fitness, population=4, generations=1, refine=CompensateExperts(),
                                                           show_progress=False)),
    CompensateExperts(),
)(model)
report("EEP 25% experts + comp.", model)
model = moe_fx.compose(Score("fisher"), PruneChannels(ratio=1 / 3, multiple=16), CompensateExperts())(model)
report("+ Fisher 1/3 channels + comp.", model)
model = Distill(teacher=source, data=windows, steps=10, batch_size=4, show_progress=False)(model)
report("+ 10 distillation steps", model)

for record in moe_fx.state_of(model).history:  # what ran, with its options and time: also in OUT_DIR/moe_fx.json
    print(f"  {record.name:20s} {record.seconds:6.2f} s")
print(f"saved to {save_checkpoint(model, out, source=source, tokenizer=tokenizer, overwrite=True)}")
