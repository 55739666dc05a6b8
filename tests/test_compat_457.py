"""transformers 4.57 (a separate environment) on moe-fx outputs: a pruned checkpoint (experts dropped, or channels
removed at one width) loads with the same logits; Optimum (optimum-onnx, which needs transformers < 4.58) exports
it with its own exporter, and loads moe-fx's ONNX export; both generate what transformers 5 generates.

Runs when MOE_FX_T457_PYTHON names a Python with transformers 4.57 (``.ci/run`` builds one, with optimum-onnx);
skipped otherwise.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_fx import compose
from moe_fx.formats import save_checkpoint
from moe_fx.formats.loading import load_model
from moe_fx.passes import DropExperts, PruneChannels, Score
from moe_fx.plan.plans import ChannelPlan

PYTHON = os.environ.get("MOE_FX_T457_PYTHON")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_t457.py"
OPTIMUM_SCRIPT = SCRIPT.with_name("check_optimum.py")
PROMPT = [5, 17, 300, 42, 8, 99, 1000, 7]
needs_457 = pytest.mark.skipif(not PYTHON, reason="set MOE_FX_T457_PYTHON to a Python with transformers 4.57")


def _run_457(script: Path, *args) -> dict:
    proc = subprocess.run([PYTHON, str(script), *map(str, args)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _greedy(path: Path, n: int, prompt: list[int] = PROMPT) -> list[int]:
    model = load_model(path, dtype="float32")
    ids = torch.tensor([prompt])
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)[0].tolist()


def _pruned_micro(micro_path: Path, tmp_path: Path) -> Path:
    model = compose(Score("random"), DropExperts(ratio=0.25))(load_model(micro_path))
    return save_checkpoint(model, tmp_path / "pruned", source=micro_path)


def _channels_halved(model):
    from moe_fx import state_of

    spec = state_of(model).spec
    plan = ChannelPlan({b.path: [list(range(0, b.experts.intermediate_size, 2))] * b.num_experts for b in spec.blocks})
    return PruneChannels(plan=plan)(model)


@needs_457
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


@needs_457
def test_rope_theta_reaches_transformers_457(tmp_path):
    """4.57 ignores v5's ``rope_parameters``: without the top-level ``rope_theta`` a 1e6 model would run with 1e4."""
    from conftest import tiny_qwen3

    model = tiny_qwen3()
    model.config.rope_parameters = {"rope_type": "default", "rope_theta": 1e6}
    model = load_model(save_checkpoint(model, tmp_path / "base"), dtype="float32")  # rebuilt with the new rope
    out = save_checkpoint(compose(Score("random"), DropExperts(ratio=0.25))(model), tmp_path / "pruned")
    assert json.loads((out / "config.json").read_text())["rope_theta"] == 1e6
    tokens = [[5, 17, 30, 42, 8, 99, 100, 7] * 4]
    with torch.no_grad():
        ref = load_model(out, dtype="float32")(input_ids=torch.tensor(tokens)).logits
    result = _run_457(SCRIPT, out, json.dumps(tokens))
    torch.testing.assert_close(torch.tensor(result["logits"]), ref, atol=1e-4, rtol=1e-4)


@needs_457
def test_optimum_exports_a_pruned_checkpoint(micro_path, tmp_path):
    """Path (a): ``optimum-cli export onnx`` (its main_export) on our pruned checkpoint, run by ORTModelForCausalLM."""
    out = _pruned_micro(micro_path, tmp_path)
    result = _run_457(OPTIMUM_SCRIPT, "cli-export", out, tmp_path / "optimum-onnx", json.dumps(PROMPT), 12)
    expected = _greedy(out, 12)
    assert result["torch"] == expected and result["ort"] == expected


@needs_457
@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_optimum_exports_other_families(family, tmp_path):
    """Path (a) on the other MoE families Optimum exports: tiny pruned models (half the experts dropped)."""
    from test_families import kept_ids, tiny_model

    from moe_fx import PrunePlan
    from moe_fx.model.trace import trace

    model = tiny_model(family).float()
    spec = trace(model)
    DropExperts(plan=PrunePlan({b.path: kept_ids(spec) for b in spec.blocks}))(model)
    out = save_checkpoint(model, tmp_path / "pruned")
    prompt = [5, 17, 30, 42, 8, 99, 100, 7]
    result = _run_457(OPTIMUM_SCRIPT, "cli-export", out, tmp_path / "optimum-onnx", json.dumps(prompt), 12)
    expected = _greedy(out, 12, prompt)
    assert result["torch"] == expected and result["ort"] == expected


@needs_457
@pytest.mark.parametrize(("moe_op", "weights", "dense"), [("fused", "float", "float"), ("unfused", "float", "float"), ("fused", "int4", "int4")])
def test_optimum_loads_moe_fx_onnx_export(moe_op, weights, dense, micro_path, tmp_path):
    """Path (b): our own export (transformers 5) loads in ORTModelForCausalLM and generates the same tokens: the
    fused MoE nodes, the plain-op experts, and int4 QMoE nodes with int4 MatMulNBits dense layers (compared with
    moe-fx's own onnxruntime runner, as int4 weights may change a greedy token)."""
    import numpy as np

    from moe_fx.deliver.onnx.export import export_onnx
    from moe_fx.deliver.onnx.runtime import OnnxCausalLM

    out = _pruned_micro(micro_path, tmp_path)
    export = export_onnx(out, tmp_path / "onnx", moe_op=moe_op, weights=weights, dense_weights=dense)
    assert bool(export.fused_blocks) == (moe_op == "fused") and bool(export.dense_quantized) == (dense == "int4")
    result = _run_457(OPTIMUM_SCRIPT, "load", export.path, json.dumps(PROMPT), 12)
    if weights == "float":
        assert result["ort"] == _greedy(out, 12)
    else:
        assert result["ort"] == OnnxCausalLM(export.path, device="cpu").generate(np.array([PROMPT]), 12)[0].tolist()
