"""A pruned checkpoint (experts dropped, or channels removed at one width) loads in transformers 4.57 (a separate environment) with the same logits.

Runs when MOE_FX_T457_PYTHON names a Python with transformers 4.57 (``.ci/run`` builds one); skipped otherwise.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_fx import compose
from moe_fx.exporters import save_checkpoint
from moe_fx.loading import load_model
from moe_fx.passes import DropExperts, PruneChannels, Score
from moe_fx.plan import ChannelPlan

PYTHON = os.environ.get("MOE_FX_T457_PYTHON")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_t457.py"


def _channels_halved(model):
    from moe_fx import state_of

    spec = state_of(model).spec
    plan = ChannelPlan({b.path: [list(range(0, b.experts.intermediate_size, 2))] * b.num_experts for b in spec.blocks})
    return PruneChannels(plan=plan)(model)


@pytest.mark.skipif(not PYTHON, reason="set MOE_FX_T457_PYTHON to a Python with transformers 4.57")
@pytest.mark.parametrize("rewrite, experts, width", [
    (lambda m: compose(Score("random"), DropExperts(ratio=0.25))(m), 6, 64),
    (_channels_halved, 8, 32),
], ids=["experts", "channels"])
def test_pruned_checkpoint_loads_in_transformers_457(rewrite, experts, width, micro_path, tmp_path):
    model = rewrite(load_model(micro_path))
    out = save_checkpoint(model, tmp_path / "pruned", source=micro_path)
    tokens = [[5, 17, 300, 42, 8, 99, 1000, 7]]
    ref_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(tokens)).logits
    proc = subprocess.run([PYTHON, str(SCRIPT), str(out), json.dumps(tokens)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["num_experts"], result["width"]) == (experts, width)
    torch.testing.assert_close(torch.tensor(result["logits"]), ref, atol=1e-4, rtol=1e-4)
