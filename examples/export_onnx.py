"""Export a (pruned) MoE model to ONNX with a KV cache, in the layout Optimum's decoders use, and run it in
onnxruntime. The export checks itself: onnxruntime's logits and greedy tokens against PyTorch's, or nothing
is written.

    python examples/export_onnx.py [MODEL_DIR] [OUT_DIR]

The command line does the same: moe-fx export onnx MODEL_DIR --out OUT_DIR. In a transformers-4.57
environment, Optimum loads the directory: ORTModelForCausalLM.from_pretrained(OUT_DIR).

Then a static decode graph of the same model (--static-cache 64 --opset 23): fixed shapes, which onnxruntime-gpu
replays as a CUDA graph, run by OnnxDecoder with the cache in place (on the CPU here when there is no GPU).
"""

import sys
from pathlib import Path

import numpy as np

from moe_fx.deliver.onnx import OnnxCausalLM, OnnxDecoder, StaticShape, export_onnx
from moe_fx.deliver.onnx.runtime import providers
from moe_fx.formats.loading import load_tokenizer

source = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "assets" / "qwen3moe-micro"
out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("out/example-onnx")

result = export_onnx(source, out, overwrite=True)  # float32; dtype="float16" for half precision
print(f"exported {result.onnx_bytes / 1e6:.1f} MB; max |logit diff| vs PyTorch {result.parity.max_abs_logit_diff:.1e}, "
      f"greedy tokens {'identical' if result.parity.greedy_identical else 'differ'}")

# plain onnxruntime, step by step through the cache (what Optimum's ORTModelForCausalLM does)
runner = OnnxCausalLM(out)
tokenizer = load_tokenizer(source)
ids = tokenizer("The president said that", return_tensors="np").input_ids
mask = np.ones_like(ids)
logits, past = runner.forward(ids, mask, runner.empty_past(1))
tokens = []
for _ in range(12):
    next_id = logits[:, -1].argmax(-1)[:, None]
    tokens.append(int(next_id[0, 0]))
    mask = np.concatenate([mask, np.ones_like(next_id)], axis=1)
    logits, past = runner.forward(next_id, mask, past)
print(tokenizer.decode(list(ids[0]) + tokens))

# the decode step at fixed shapes: one token a step over a 64-slot cache, attention on the grouped heads (opset 23)
static = export_onnx(source, out.with_name(out.name + "-static"), static=StaticShape(batch_size=1, max_cache_len=64), opset=23, overwrite=True)
device = "cuda" if providers()[0] == "CUDAExecutionProvider" else "cpu"
decoded = OnnxDecoder(static.path, device=device).generate(ids, 12)[0, ids.shape[1]:]
print(f"static decode graph on {device}: {'the same' if list(decoded) == tokens else 'different'} {len(tokens)} tokens")
