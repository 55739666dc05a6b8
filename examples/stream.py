"""Prune a model bigger than the GPU: one decoder layer at a time is read from disk, calibrated on the hidden
states the previous layers produced, scored, pruned, written as its own shard and freed; only the hidden states
between layers stay in memory. The result is the checkpoint the in-memory prune writes, bit for bit.

    python examples/stream.py [MODEL_DIR] [OUT_DIR] [cpu|cuda]

The command line streams on its own when the weights exceed 80% of the device's free memory (or --stream on).
An interrupted run resumes after the last finished layer.
"""

import sys
from pathlib import Path

from moe_fx.formats.loading import load_tokenizer
from moe_fx.passes import Calibrate, DropExperts, Score
from moe_fx.run.streaming import stream_prune

ASSETS = Path(__file__).parent / "assets"
source = Path(sys.argv[1]) if len(sys.argv) > 1 else ASSETS / "qwen3moe-micro"
out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("out/example-stream")
device = sys.argv[3] if len(sys.argv) > 3 else "cpu"

result = stream_prune(
    source, out,
    [Calibrate(ASSETS / "calib.jsonl.gz", tokenizer=load_tokenizer(source), max_tokens=30_000, seq_len=256), Score("reap"), DropExperts(ratio=0.5)],
    device=device, overwrite=True, show_progress=False,
)
print(f"streamed {result.layers} layers in {result.seconds:.1f} s; largest layer {result.layer_weight_bytes / 1e6:.1f} MB, "
      f"hidden states {result.hidden_state_bytes / 1e6:.1f} MB, peak CPU memory {result.peak_cpu_bytes / 1e9:.2f} GB")
print(f"kept experts: {result.state.plan.kept_experts}; checkpoint in {result.out}")
