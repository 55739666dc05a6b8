"""``--dense-weights int4``: the dense linear layers as onnxruntime ``MatMulNBits`` nodes (attention projections,
shared-expert MLPs, the LM head, tied or not), routers kept float, parity against the dequantized model at the float
tolerance on onnxruntime's CPU kernels, with expert QMoE and static attention nodes beside them; the option's
refusal."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx_cases import first_layer_pruned

from moe_fx.cli import main
from moe_fx.deliver.onnx import StaticShape
from moe_fx.deliver.onnx import export as onnx_export
from moe_fx.deliver.onnx.quantized_matmuls import dense_linears, quantize_linears
from moe_fx.deliver.onnx.quantized_weights import dequantize_blocks, quantize_blocks
from moe_fx.errors import BadOptionError
from moe_fx.model.trace import trace

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _graph(path):
    import onnx_ir as ir

    return ir.load(str(path / "model.onnx")).graph


def test_layers_chosen_and_quantized_as_the_node_reads_them() -> None:
    """Every linear layer but the routers and the shared-expert gates (Qwen2-MoE has both); each weight's packed
    int4 form dequantizes to QMoE's own block quantization of it, an all-zero row to zeros."""
    model = first_layer_pruned("qwen2_moe")
    spec = trace(model)
    linears = dense_linears(model)
    routing = {b.router.path for b in spec.blocks} | {s.gate_path for b in spec.blocks for s in b.shared}
    every = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert routing and set(linears) == every - routing and "lm_head" in linears
    name = "model.layers.0.self_attn.q_proj"
    with torch.no_grad():
        linears[name].weight[3] = 0
    q = quantize_linears({name: linears[name]})[name]
    weight = linears[name].weight.detach().numpy()
    rows, k = weight.shape
    assert q.shape == (rows, k) and q.packed.shape == (rows, k // q.block_size, q.block_size // 2) and q.block_size == 64
    packed, scales = quantize_blocks(weight[None], "int4", q.block_size)
    np.testing.assert_array_equal(q.dequantized().numpy(), dequantize_blocks(packed, scales, "int4", q.block_size, k)[0])
    assert (q.dequantized()[3] == 0).all() and np.abs(q.dequantized().numpy() - weight).max() <= np.abs(weight).max() / 7


@pytest.mark.parametrize(("family", "options"), [
    ("qwen2_moe", {}),  # shared experts exported as Gemm, their gate kept float
    ("gpt_oss", {"static": StaticShape(1, 40), "attention": "gqa", "weights": "int4"}),  # biases, QMoE and attention nodes
])
def test_export_matches_the_dequantized_model(family: str, options: dict, tmp_path) -> None:
    """Each chosen layer is one MatMulNBits node reading its int4 weight (no float copy left; two equal ones may share
    one), the routers stay float;
    logits within 1e-4 of the model with the same dequantized weights and greedy tokens identical; the difference to
    the float model is recorded apart."""
    model = first_layer_pruned(family)
    layers = model.model.layers
    with torch.no_grad():  # two layers of equal weights (which the graph may hold once) both count
        layers[1].self_attn.o_proj.weight.copy_(layers[0].self_attn.o_proj.weight)
    expected = sorted(dense_linears(model))
    result = onnx_export.export_onnx(model, tmp_path / "onnx", dense_weights="int4", **options)
    assert sorted(result.dense_quantized) == expected
    assert result.parity.max_abs_logit_diff <= 1e-4 and result.parity.greedy_identical
    assert result.quantization is not None and result.quantization.max_abs_logit_diff > result.parity.max_abs_logit_diff
    graph = _graph(result.path)
    nbits = [n for n in graph.all_nodes() if n.op_type == "MatMulNBits"]
    assert len(nbits) == len(expected) and {n.domain for n in nbits} == {"com.microsoft"}
    assert {n.attributes["bits"].value for n in nbits} == {4}
    float_matrices = {tuple(v.shape) for v in graph.initializers.values() if len(v.shape) == 2}
    for name in expected:
        rows, k = model.get_submodule(name).weight.shape
        assert (k, rows) not in float_matrices and (name == "lm_head" or (rows, k) not in float_matrices), name
    record = json.loads((result.path / "moe_fx.json").read_text())["onnx_export"]
    assert record["dense_weights"] == "int4" and sorted(record["dense_quantized"]) == expected


def test_cli_quantizes_the_tied_lm_head_of_the_trained_micro_model(capsys, micro_path, tmp_path) -> None:
    """The micro model ties its LM head to the embeddings: the graph keeps the float matrix for the lookup and the LM
    head reads an int4 copy; with int4 experts beside, checked against the dequantized model."""
    code = main(["export", "onnx", str(micro_path), "--out", str(tmp_path / "q"), "--weights", "int4", "--dense-weights", "int4"])
    assert code == 0
    out = capsys.readouterr().out
    assert "dense layers" in out and "as com.microsoft.MatMulNBits int4" in out
    assert "vs the dequantized experts and dense layers" in out and "int4 vs float model" in out
    record = json.loads((tmp_path / "q" / "moe_fx.json").read_text())["onnx_export"]
    assert "lm_head" in record["dense_quantized"] and record["parity"]["max_abs_logit_diff"] <= 1e-4
    initializers = _graph(tmp_path / "q").initializers
    assert {"lm_head.weight", "lm_head.weight.q4", "lm_head.weight.scales"} <= set(initializers)
    assert initializers["lm_head.weight.q4"].dtype.name == "UINT8"


def test_bad_format_refused_before_any_work(tmp_path) -> None:
    with pytest.raises(BadOptionError, match="--dense-weights 'int8' is not one of float, int4"):
        onnx_export.export_onnx(first_layer_pruned("qwen3_moe"), tmp_path / "x", dense_weights="int8")
    assert not (tmp_path / "x").exists()


def test_quality_benchmark_runs_on_the_micro_model(micro_path, calib_path, tmp_path, monkeypatch) -> None:
    """``benchmarks/onnx_int4_quality.py`` end to end (tiny budget, in this process): the float export's NLL is
    PyTorch's, the int4 one's is its own with the difference to the float model recorded."""
    monkeypatch.syspath_prepend(str(BENCH))
    import onnx_int4_quality

    out = tmp_path / "q.json"
    monkeypatch.setattr(sys, "argv", ["onnx_int4_quality.py", "--model", str(micro_path), "--valid", str(calib_path), "--exports", "fused",
                                      "fused-dense-int4", "--seq-len", "64", "--eval-seqs", "1", "--out", str(out)])
    onnx_int4_quality.main()
    rows = json.loads(out.read_text())["rows"]
    assert rows["onnx fused"]["nll"] == pytest.approx(rows["torch float32"]["nll"], abs=1e-4)
    dense = rows["onnx fused-dense-int4"]
    assert dense["nll"] != rows["onnx fused"]["nll"] and dense["vs_float_model"]["max_abs_logit_diff"] > 0
