"""Fused ONNX MoE export: each block's routed experts as one onnxruntime ``com.microsoft.MoE`` node (``QMoE`` with
int8/int4 weights), for every family whose experts the operator computes, with per-layer expert counts and
widths; the recorded fallback of a block it cannot express; the integer weight format; bad options."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_qwen3
from onnx_cases import channel_pruned_export, first_layer_pruned, float16_export, pruned_family_export
from test_families import tiny_model
from tiny_models import tiny_model as build_tiny

from moe_fx import state_of
from moe_fx.cli import main
from moe_fx.deliver.onnx import export as onnx_export
from moe_fx.deliver.onnx.fused_experts import plan_fusion, route_in_operator
from moe_fx.deliver.onnx.quantized_weights import block_size_for, dequantize_blocks, quantize_blocks
from moe_fx.errors import BadOptionError
from moe_fx.model.trace import trace

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3", "olmoe", "qwen2_moe", "granitemoe", "gpt_oss"]
"""Softmax (renormalized or not), sigmoid with group-limited routing and bias, shared experts, and GPT-OSS's
clamped, interleaved SwiGLU with biases."""
ROUTED_IN_OPERATOR = {"qwen3_moe", "mixtral", "deepseek_v2", "olmoe", "qwen2_moe"}
"""Families whose routing the operator computes from the raw logits (softmax, top-k, renormalized or not);
DeepSeek-V3 (sigmoid, bias, groups), GraniteMoE and GPT-OSS (softmax after the top-k) keep it in their own ops."""


def _graph_nodes(path) -> list:
    import onnx_ir as ir

    return list(ir.load(str(path / "model.onnx")).graph.all_nodes())


def _moe_nodes(path) -> list:
    return [n for n in _graph_nodes(path) if n.domain == "com.microsoft" and n.op_type in ("MoE", "QMoE")]


def _assert_exact(result) -> None:
    par = result.parity
    assert par is not None and par.max_abs_logit_diff <= 1e-4 and par.greedy_identical and par.generated_tokens > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_every_block_fused_and_matches(family: str, once) -> None:
    """Per-layer expert counts (the first MoE layer pruned), saved, exported from the directory: one MoE node per
    block holding exactly that block's experts, no other copy of the expert weights, logits within 1e-4.
    (The export test_onnx.py checks for its interface and weights.)"""
    model, _, result = pruned_family_export(once, family)
    blocks = state_of(model).spec.blocks
    assert result.fused_blocks == [b.path for b in blocks] and result.unfused_blocks == {}
    routed = result.routed_in_operator
    assert routed == ([b.path for b in blocks] if family in ROUTED_IN_OPERATOR else [])
    _assert_exact(result)
    nodes = _moe_nodes(result.path)
    assert [n.op_type for n in nodes] == ["MoE"] * len(blocks)
    for node, block in zip(nodes, blocks):
        fc1, fc2 = node.inputs[2], node.inputs[4]
        assert fc1.shape[0] == fc2.shape[0] == block.num_experts
        assert node.attributes["k"].value == block.router.top_k
        assert node.attributes["normalize_routing_weights"].value == int(block.path in routed and block.router.norm_topk_prob)
    ops = {n.op_type for n in _graph_nodes(result.path)}
    assert ("TopK" in ops) is not bool(routed)  # the model's routing left the graph with it
    assert abs(result.initializer_bytes - result.parameter_bytes) <= 0.01 * result.parameter_bytes + 8192
    record = json.loads((result.path / "moe_fx.json").read_text())["onnx_export"]
    assert record["fused_blocks"] == result.fused_blocks and record["weights"] == "float"
    assert record["routed_in_operator"] == routed


def test_gpt_oss_clamped_swiglu_attributes(once) -> None:
    """GPT-OSS maps onto the operator's SwiGLU with its alpha, beta = 1 and the clamp; biases are inputs."""
    model, _, result = pruned_family_export(once, "gpt_oss")
    node = _moe_nodes(result.path)[0]
    experts = model.get_submodule(state_of(model).spec.blocks[0].experts.path)
    attrs = {k: v.value for k, v in node.attributes.items()}
    assert attrs["activation_type"] == "swiglu" and attrs["swiglu_fusion"] == 1
    assert attrs["activation_alpha"] == pytest.approx(experts.alpha) and attrs["activation_beta"] == 1.0
    assert attrs["swiglu_limit"] == pytest.approx(experts.limit)
    assert node.inputs[3] is not None and node.inputs[5] is not None  # fc1 and fc2 biases


def test_per_expert_widths_fuse(once) -> None:
    """Channel pruning with per-expert widths (zero-padded to each layer's widest) and a layer with fewer experts."""
    model, result = channel_pruned_export(once)
    _assert_exact(result)
    shapes = [(n.inputs[2].shape[0], n.inputs[4].shape[2]) for n in _moe_nodes(result.path)]
    assert shapes == [(b.num_experts, b.experts.intermediate_size) for b in state_of(model).spec.blocks] == [(7, 8), (8, 16)]


def _unfused_export(once):
    """Tiny Qwen3 on plain ops (``moe_op="unfused"``) with a past: also the interface fusions must keep."""
    return once("unfused", lambda tmp: onnx_export.export_onnx(tiny_qwen3(), tmp / "onnx", moe_op="unfused"))


def test_unfused_keeps_plain_ops(once) -> None:
    result = _unfused_export(once)
    _assert_exact(result)
    assert result.fused_blocks == [] and _moe_nodes(result.path) == []


@pytest.mark.parametrize(("family", "weights"), [("qwen3_moe", "int4"), ("gpt_oss", "int4"), ("deepseek_v3", "int8")])
def test_integer_weights(family: str, weights: str, once, tmp_path) -> None:
    """QMoE nodes (per-layer expert counts: the first MoE layer pruned): exact against the model with the
    dequantized experts (the float tolerance), the difference to the float model recorded, the model's own weights
    untouched, fewer bytes than the float export of the same model."""
    model = first_layer_pruned(family)
    before = {n: p.clone() for n, p in model.named_parameters()}
    result = onnx_export.export_onnx(model, tmp_path / "onnx", weights=weights)
    _assert_exact(result)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    nodes = _moe_nodes(result.path)
    assert {n.op_type for n in nodes} == {"QMoE"}
    bits = nodes[0].attributes["expert_weight_bits"].value
    assert bits == int(weights[3:]) and nodes[0].attributes["weights_prepacked"].value == 0
    assert (nodes[0].attributes.get("block_size") is None) == (weights == "int8")
    q = result.quantization
    assert q is not None and 0 < q.max_abs_logit_diff < 0.5 * q.logit_scale
    _, _, float_export = pruned_family_export(once, family)
    assert float_export.weights == "float" and result.initializer_bytes < float_export.initializer_bytes


def test_quantized_blocks_round_trip() -> None:
    """Symmetric codes around the default zero point, int4 packed lower nibble first, error within half a step."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 8, 64)).astype(np.float32)
    for fmt, block in (("int8", block_size_for("int8", 64, 32)), ("int4", block_size_for("int4", 64, 32))):
        q, scales = quantize_blocks(w, fmt, block)
        back = dequantize_blocks(q, scales, fmt, block, 64)
        step = np.repeat(scales, block, axis=-1) if block else scales[..., None]
        assert np.all(np.abs(back - w) <= step / 2 + 1e-6)
        assert q.shape == ((3, 8, 64) if fmt == "int8" else (3, 8, 32))
    assert block_size_for("int8", 64, 32) == 0 and block_size_for("int4", 64, 32) == 32 and block_size_for("int4", 2048, 768) == 128
    assert block_size_for("int4", 24, 40) == 0  # no power of two >= 16 divides both: one scale per row
    q, _ = quantize_blocks(np.array([[[-7.0, 7.0]]], np.float32), "int4", 0)
    assert q.tolist() == [[[0x01 | (0x0F << 4)]]]  # -7 + 8 = 1 in the low nibble, 7 + 8 = 15 in the high one


def test_block_the_operator_cannot_express_falls_back(tmp_path) -> None:
    """Nemotron-H's experts are squared-ReLU MLPs (no CPU kernel of the operator has that activation): its block
    stays on plain ops, the reason recorded; asking for fused nodes when no block maps is refused up front.
    Its MoE and attention layers only (no Mamba layer, whose trace is most of an export), a narrow shared expert."""
    model = build_tiny("nemotron_h", layers_block_type=["full_attention", "moe"], moe_shared_expert_intermediate_size=32).float()
    assert [type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Experts")] == ["NemotronHExperts"]
    result = onnx_export.export_onnx(model, tmp_path / "onnx", with_past=False)
    assert result.fused_blocks == [] and result.unfused_blocks
    assert all("none of the operator's activations" in why for why in result.unfused_blocks.values())
    _assert_exact(result)
    with pytest.raises(BadOptionError, match="maps onto onnxruntime's MoE operator"):
        onnx_export.export_onnx(model, tmp_path / "fused", moe_op="fused", with_past=False)
    assert not (tmp_path / "fused").exists()
    muse = tiny_model("muse_spark")  # a norm after each expert's down projection: no operator input for it
    assert all("norm after each expert" in why for why in plan_fusion(muse, trace(muse)).values())


def test_float16_on_cpu_stays_unfused_by_default(once, tmp_path) -> None:
    """onnxruntime's CPU MoE kernel is float32 only: a float16 export checked on the CPU keeps plain ops (recorded),
    and --moe-op fused with that check is refused before any work."""
    result = float16_export(once)  # the export test_onnx.py checks for parity
    assert result.dtype == "float16"
    assert result.fused_blocks == [] and all("float32 only" in why for why in result.unfused_blocks.values())
    with pytest.raises(BadOptionError, match="float32 only"):
        onnx_export.export_onnx(tiny_qwen3(), tmp_path / "x", dtype="float16", moe_op="fused")
    unchecked = onnx_export.export_onnx(tiny_qwen3(), tmp_path / "gpu", dtype="float16", moe_op="fused", check=False, with_past=False)
    assert len(unchecked.fused_blocks) == 2 and unchecked.parity is None


def test_cli_fused_int4_and_bad_options(capsys, micro_path, tmp_path) -> None:
    code = main(["export", "onnx", str(micro_path), "--out", str(tmp_path / "onnx"), "--weights", "int4", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "as com.microsoft.QMoE int4" in out and "vs the dequantized experts" in out and "int4 vs float model" in out
    assert "(2 routing in the node)" in out  # the micro model renormalizes: its routers run in the QMoE nodes
    code = main(["export", "onnx", str(micro_path), "--out", str(tmp_path / "kept"), "--model-routing", "--no-past", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0 and "routing in the node" not in out, err
    assert json.loads((tmp_path / "kept" / "moe_fx.json").read_text())["onnx_export"]["routed_in_operator"] == []
    assert "TopK" in {n.op_type for n in _graph_nodes(tmp_path / "kept")}

    def refused(*argv: str) -> str:
        assert main(["export", "onnx", str(micro_path), "--out", str(tmp_path / "x"), *argv]) == 2
        return capsys.readouterr().err

    assert "drop --moe-op unfused" in refused("--weights", "int8", "--moe-op", "unfused")
    assert "float32 only" in refused("--moe-op", "fused", "--dtype", "float16")
    assert not (tmp_path / "x").exists()


def test_ort_fusions_keep_the_interface_and_the_moe_nodes(once, tmp_path) -> None:
    """transformers' onnxruntime fusions (attention, norms) run after the MoE nodes exist and keep Optimum's interface."""
    plain = _unfused_export(once)  # the same model and past, without the fusions
    fused = onnx_export.export_onnx(tiny_qwen3(), tmp_path / "fused", ort_fusions="cpu")
    _assert_exact(fused)
    assert fused.inputs == plain.inputs and fused.outputs == plain.outputs and len(_moe_nodes(fused.path)) == 2
    with pytest.raises(BadOptionError, match="--ort-fusions 'tpu'"):
        onnx_export.export_onnx(tiny_qwen3(), tmp_path / "x", ort_fusions="tpu")


def test_gpu_benchmark_script_runs_on_cpu(tmp_path, monkeypatch) -> None:
    """benchmarks/onnx_gpu.py, both phases, at tiny shapes (one layer) on the CPU (the GPU run is the same code):
    the export phase run as ``__main__`` in this process, the time phase as the script's own process."""
    import runpy
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    common = ["--tiny", "--layers", "1", "--device", "cpu", "--dtype", "float32", "--exports", "fused", "--variants", "experts-50%",
              "--batches", "2", "--repeats", "2", "--steps", "2", "--dir", str(tmp_path / "exports")]
    for phase in ("export", "time"):
        out = tmp_path / f"{phase}.json"
        argv = ["onnx_gpu.py", "--phase", phase, *common, "--out", str(out)]
        if phase == "export":
            monkeypatch.chdir(bench)
            monkeypatch.syspath_prepend(str(bench))
            monkeypatch.setattr(sys, "argv", argv)
            runpy.run_path(str(bench / "onnx_gpu.py"), run_name="__main__")
        else:
            proc = subprocess.run([sys.executable, *argv], cwd=bench, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stderr[-2000:]
        results = json.loads(out.read_text())["results"]
        assert list(results) == (["experts-50%/fused"] if phase == "export" else ["experts-50%/torch moe_fx eager", "experts-50%/onnx fused"])
    assert results["experts-50%/onnx fused"]["b2"]["decode_ms"] > 0


def test_routing_stays_encoded_where_the_operator_would_route_otherwise() -> None:
    """``route_in_operator`` hands a block's routing to the operator only where a sample forward confirms the
    spec's rule on the router's real input and logits: a router that transforms its logits (as Muse Spark's
    does: the spec cannot tell) or reads another input than the experts keeps the encoded routing."""
    model = build_tiny("mixtral").eval()
    spec = trace(model)
    plan = plan_fusion(model, spec)
    paths = [b.path for b in spec.blocks]
    assert all(route_in_operator(model, spec, plan)[p].router is not None for p in paths)
    first = model.get_submodule(spec.blocks[0].router.path)
    forward = first.forward
    first.forward = lambda hidden, *a, **k: forward(hidden * 3.0, *a, **k)  # its logits scaled before the softmax
    routed = route_in_operator(model, spec, plan)
    assert routed[paths[0]].router is None and routed[paths[1]].router is not None
    handle = first.register_forward_pre_hook(lambda module, args: (args[0] + 1.0,))  # another input than the experts'
    first.forward = forward
    try:
        assert route_in_operator(model, spec, plan)[paths[0]].router is None
    finally:
        handle.remove()
    experts = model.get_submodule(spec.blocks[0].experts.path)  # the same experts, their weights scaled (the ranking
    handle = experts.register_forward_pre_hook(lambda module, args: (*args[:2], 2.0 * args[2]))  # agrees, the sums do not)
    try:
        assert route_in_operator(model, spec, plan)[paths[0]].router is None
    finally:
        handle.remove()
    assert route_in_operator(model, spec, plan)[paths[0]].router is not None
