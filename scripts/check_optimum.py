"""Optimum's ONNX path in a transformers-4.57 environment (optimum-onnx needs transformers < 4.58), on moe-fx
outputs; prints JSON for ``tests/test_compat_457.py``, which compares it with transformers 5.

    check_optimum.py cli-export CHECKPOINT OUT_DIR PROMPT_JSON N   # optimum's exporter on our checkpoint
    check_optimum.py load ONNX_DIR PROMPT_JSON N                   # ORTModelForCausalLM on our own export

Both print the greedy continuation of the prompt by ORTModelForCausalLM (and, for cli-export, by the 4.57
PyTorch model as well).
"""

import json
import sys

import torch
from optimum.onnxruntime import ORTModelForCausalLM


def greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0].tolist()


mode, args = sys.argv[1], sys.argv[2:]
if mode == "cli-export":
    from optimum.exporters.onnx import main_export
    from transformers import AutoModelForCausalLM

    checkpoint, out, prompt, n = args[0], args[1], json.loads(args[2]), int(args[3])
    main_export(checkpoint, output=out, task="text-generation-with-past")
    torch_model = AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32).eval()
    result = {"torch": greedy(torch_model, prompt, n), "ort": greedy(ORTModelForCausalLM.from_pretrained(out), prompt, n)}
elif mode == "load":
    directory, prompt, n = args[0], json.loads(args[1]), int(args[2])
    result = {"ort": greedy(ORTModelForCausalLM.from_pretrained(directory), prompt, n)}
else:
    sys.exit(f"unknown mode {mode!r}")
print(json.dumps(result))
