"""Load a moe-fx checkpoint in transformers 4.57 and print its logits on fixed tokens (JSON), for
comparison with transformers 5 (``tests/test_compat_457.py`` runs this in a separate environment)."""

import json
import sys

import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32).eval()
tokens = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = model(input_ids=tokens).logits
print(json.dumps({
    "num_experts": getattr(model.config, "num_experts", None),
    "width": getattr(model.config, "moe_intermediate_size", None),
    "logits": logits.tolist(),
}))
