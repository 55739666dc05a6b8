"""Prune, then quantize: REAP drops half the experts, the kept experts are written as int4 in compressed-tensors'
format (what vLLM serves; stock transformers loads it with the compressed-tensors package), and the same
experts run quantized in memory through moe-fx's kernels.

    python examples/quantize.py [MODEL_DIR] [OUT_DIR]

The command line does the same: moe-fx prune MODEL_DIR --ratio 0.5 --calib TEXT --quantize int4-group --out OUT_DIR
(int4 groups of 128; the micro model's hidden size of 64 needs moe-fx quantize --group-size 32 instead).
"""

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import moe_fx
from moe_fx.evaluate.nll import build_eval_set, disk_size, evaluate_nll
from moe_fx.formats import save_checkpoint
from moe_fx.formats.loading import load_tokenizer
from moe_fx.formats.quantized_checkpoint import quantize_checkpoint
from moe_fx.passes import Calibrate, DropExperts, QuantizeExperts, Score

ASSETS = Path(__file__).parent / "assets"
source = Path(sys.argv[1]) if len(sys.argv) > 1 else ASSETS / "qwen3moe-micro"
out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("out/example-quantize")
pruned_dir = out.parent / f"{out.name}-bf16"

model = moe_fx.load(source)
pruned = moe_fx.compose(Calibrate(ASSETS / "calib.jsonl.gz", max_tokens=20_000, seq_len=256), Score("reap"), DropExperts(ratio=0.5))(model)
save_checkpoint(pruned.to(torch.bfloat16), pruned_dir, source=source, overwrite=True, report=False)
entry = quantize_checkpoint(pruned_dir, out, scheme="int4-group", group_size=32, overwrite=True)  # the source stays as it is
print(f"int4 experts: {disk_size(source) / 1e6:.2f} MB source -> {disk_size(pruned_dir) / 1e6:.2f} MB pruned -> "
      f"{disk_size(out) / 1e6:.2f} MB int4 ({entry['tensors']} expert projections)")

# the checkpoint is a stock one (transformers dequantizes int4 on load here); the in-memory form keeps int4 codes
eval_set = build_eval_set(ASSETS / "valid.jsonl.gz", load_tokenizer(source), seq_len=256, seqs_per_domain=2)
nll = {
    "bf16 pruned": evaluate_nll(moe_fx.load(pruned_dir), eval_set, show_progress=False),
    "int4 checkpoint (transformers)": evaluate_nll(AutoModelForCausalLM.from_pretrained(out), eval_set, show_progress=False),
    "int4 in memory (moe-fx kernels)": evaluate_nll(moe_fx.compose(QuantizeExperts("int4-group"))(moe_fx.load(pruned_dir)), eval_set,
                                                    show_progress=False),
}
for name, result in nll.items():
    print(f"mean NLL {name}: {result['mean']['nll']:.4f}")
print(f"checkpoint in {out}")
