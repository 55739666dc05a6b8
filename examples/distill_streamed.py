"""Recover a pruned model bigger than the GPU: stream the prune (one decoder layer at a time) and, in the same
pass, cache the unpruned model's top-64 next-token distributions on the calibration windows; then load the
pruned student alone and distill it on the cache. The teacher is never whole in memory.

    python examples/distill_streamed.py [MODEL_DIR] [OUT_DIR] [cpu|cuda]

The command line does the same with `moe-fx prune MODEL --stream on --distill-steps 200 --distill-teacher cached`
(or `--preset best`); in memory, `CacheTeacher` before the pruning passes and `Distill(teacher="cached")` after.
"""

import sys
import tempfile
from pathlib import Path

from moe_fx import compose, state_of
from moe_fx.formats import save_checkpoint
from moe_fx.formats.loading import load_model, load_tokenizer
from moe_fx.passes import Calibrate, CompensateExperts, Distill, DropExperts, Score
from moe_fx.run.streaming import stream_prune

ASSETS = Path(__file__).parent / "assets"
source = Path(sys.argv[1]) if len(sys.argv) > 1 else ASSETS / "qwen3moe-micro"
out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("out/example-distill-streamed")
device = sys.argv[3] if len(sys.argv) > 3 else "cpu"

with tempfile.TemporaryDirectory() as work:
    pruned, cache = Path(work) / "pruned", Path(work) / "teacher"
    calibrate = Calibrate(ASSETS / "calib.jsonl.gz", tokenizer=load_tokenizer(source), max_tokens=16_384, seq_len=128,
                          observers=("routing", "reap", "inputs"))
    stream_prune(source, pruned, [calibrate, Score("reap"), DropExperts(ratio=0.5), CompensateExperts()],
                 device=device, show_progress=False, teacher_cache=cache, teacher_top_k=64)
    student = load_model(pruned, device=device)  # only the pruned model is loaded
    student = compose(Distill(teacher=cache, steps=20, batch_size=8, show_progress=False))(student)
    save_checkpoint(student, out, source=source, overwrite=True)

distilled = state_of(student).report_of("distill")
print(f"distilled on the {distilled['teacher']} teacher: KL {distilled['kl_first']:.4f} -> {distilled['kl_last']:.4f} over {distilled['steps']} steps")
print(f"saved to {out}")
