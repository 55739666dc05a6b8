"""Run a (pruned) MoE model fast: ``moe_fx.compile`` switches its experts to moe-fx's kernels and compiles the
whole graph (no graph break); the compiled model computes the eager model's logits.

    python examples/compile.py [MODEL_DIR]

On a GPU, decode with CUDA graphs: ``moe_fx.compile(model, mode="reduce-overhead")`` with a ``StaticCache``.
"""

import sys
import time
from pathlib import Path

import torch

import moe_fx
from moe_fx.formats.loading import load_tokenizer

source = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "assets" / "qwen3moe-micro"
model = moe_fx.load(source, dtype="float32")  # per-layer checkpoints (different counts per layer) load too
tokenizer = load_tokenizer(source)
ids = tokenizer("The president said that", return_tensors="pt").input_ids

fast = moe_fx.compile(model)  # torch.compile(fullgraph=True) over the moe_fx experts implementation
with torch.no_grad():
    eager_logits = model(ids).logits
    t0 = time.perf_counter()
    compiled_logits = fast(ids).logits  # the first call compiles
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast(ids)
    again = time.perf_counter() - t0
diff = (eager_logits - compiled_logits).abs().max().item()
print(f"compiled: first call {first:.1f} s (compilation), then {1000 * again:.1f} ms; max |logit diff| vs eager {diff:.2e}")
generated = model.generate(ids, max_new_tokens=12, do_sample=False)
print(tokenizer.decode(generated[0]))
