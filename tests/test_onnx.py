"""Delivery: ONNX export (with and without KV cache) of pruned models of five families, onnxruntime parity,
the graph holding exactly the reduced weights, the CLI, bad input; and torch.compile parity."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from conftest import tiny_qwen3
from onnx_cases import channel_pruned_export, float16_export, pruned_family_export
from test_per_layer import _uneven

import moe_fx
from moe_fx import state_of
from moe_fx.cli import main
from moe_fx.deliver.compile import compile_model
from moe_fx.deliver.onnx import export as onnx_export
from moe_fx.errors import BadOptionError, MoeFxError, OutputPathError
from moe_fx.passes import DropExperts

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

OPTIMUM_FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3", "olmoe", "gpt_oss", "llama4"]
X = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(5))


def _expert_shapes(tensors) -> Counter:
    """Multiset of the 3-D tensors' shapes, up to the order of the last two axes (the graph may hold transposes)."""
    return Counter((s[0], *sorted(s[1:])) for s in (tuple(t) for t in tensors) if len(s) == 3)


def _graph_expert_shapes(path) -> Counter:
    import onnx_ir as ir

    model = ir.load(str(path / "model.onnx"))
    return _expert_shapes(v.shape for v in model.graph.initializers.values())


def _assert_matches(result, model) -> None:
    par = result.parity
    assert par is not None and par.max_abs_logit_diff <= 1e-4 and par.greedy_identical and par.generated_tokens > 0
    # the graph holds the reduced experts (every kept expert, every kept channel, nothing more) ...
    assert _graph_expert_shapes(result.path) == _expert_shapes(p.shape for p in model.parameters())
    # ... and no other copy of the weights
    assert abs(result.initializer_bytes - result.parameter_bytes) <= 0.01 * result.parameter_bytes + 4096


@pytest.mark.parametrize("family", OPTIMUM_FAMILIES)
def test_pruned_family_exports_and_matches(family: str, once) -> None:
    """Per-layer expert counts (the first MoE layer pruned), saved, exported from the directory with a past
    (the export test_onnx_fused.py checks for its MoE nodes)."""
    model, ckpt, result = pruned_family_export(once, family)
    assert [n for n in result.inputs if not n.startswith("past_key_values.")] == ["input_ids", "attention_mask", "position_ids"]
    layers = len({n.split(".")[1] for n in result.inputs if n.startswith("past_key_values.")})
    assert result.outputs == ["logits"] + [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    assert result.inputs[3:] == [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    _assert_matches(result, model)
    record = json.loads((result.path / "moe_fx.json").read_text())
    assert record["passes"] and record["onnx_export"]["parity"]["greedy_identical"]
    assert json.loads((result.path / "config.json").read_text()) == json.loads((ckpt / "config.json").read_text())


def test_sliding_window_past_the_window(tmp_path) -> None:
    """GPT-OSS's sliding layers: generation beyond the window matches; the window is a constant, not an input."""
    from tiny_models import auto_class, tiny_config

    config = tiny_config("gpt_oss")
    config.sliding_window = 6
    torch.manual_seed(0)
    model = auto_class(config).from_config(config).eval()
    result = onnx_export.export_onnx(model, tmp_path / "onnx")  # prompt 12 + 16 new tokens > window 6
    assert result.folded_constants == {"layers.0._sliding_window_tensor": 6}
    assert not any("sliding" in n for n in result.inputs + result.outputs)
    _assert_matches(result, model)


def test_channel_pruned_per_expert_widths_export(once) -> None:
    model, result = channel_pruned_export(once)  # per-expert widths, padded to each layer's widest; an expert with none dropped
    assert [(b.num_experts, b.experts.intermediate_size) for b in state_of(model).spec.blocks] == [(7, 8), (8, 16)]
    assert result.inputs == ["input_ids", "attention_mask", "position_ids"] and result.outputs == ["logits"]
    _assert_matches(result, model)


def test_float16_export_matches(once) -> None:
    result = float16_export(once)
    assert result.dtype == "float16" and result.parity.greedy_identical
    assert result.parity.max_abs_logit_diff <= onnx_export.HALF_LOGIT_TOLERANCE * max(1.0, result.parity.logit_scale)


def test_cli_exports_the_trained_micro_model(capsys, micro_path, tmp_path) -> None:
    code = main(["export", "onnx", str(micro_path), "--out", str(tmp_path / "onnx"), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "identical" in out and "max |logit diff|" in out
    files = {p.name for p in (tmp_path / "onnx").iterdir()}
    assert {"model.onnx", "config.json", "generation_config.json", "tokenizer.json", "moe_fx.json"} <= files
    import onnx

    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph
    assert not any(p.key.endswith("stack_trace") for n in graph.node for p in n.metadata_props)
    dims = [d.dim_param for d in graph.input[3].type.tensor_type.shape.dim]
    assert dims[0] == "batch_size" and dims[2] == "past_sequence_length"


def test_bad_export_input_is_named(capsys, micro_path, tmp_path) -> None:
    def run(*argv: str) -> str:
        assert main(["export", "onnx", *argv]) == 2
        return capsys.readouterr().err

    assert "not a model directory" in run(str(tmp_path), "--out", str(tmp_path / "x"))
    assert "--opset 7 is not supported" in run(str(micro_path), "--out", str(tmp_path / "x"), "--opset", "7")
    assert "overlaps the source" in run(str(micro_path), "--out", str(micro_path / "onnx"))
    assert "do not run bfloat16" in run(str(micro_path), "--out", str(tmp_path / "x"), "--dtype", "bfloat16")
    (tmp_path / "taken").mkdir()
    assert "already exists" in run(str(micro_path), "--out", str(tmp_path / "taken"))
    with pytest.raises(OutputPathError):
        onnx_export.export_onnx(tiny_qwen3(), tmp_path / "taken")


def test_weights_past_the_protobuf_limit_go_to_external_data(monkeypatch, tmp_path) -> None:
    """The >2 GB path, on a tiny model with the limit lowered: weights in model.onnx_data, which onnxruntime reads."""
    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", 0)
    result = onnx_export.export_onnx(tiny_qwen3(), tmp_path / "onnx", with_past=False)
    data = result.path / onnx_export.EXTERNAL_DATA_FILE
    assert data.stat().st_size >= result.initializer_bytes * 0.9 > (result.path / "model.onnx").stat().st_size
    assert result.parity.greedy_identical and result.parity.max_abs_logit_diff <= 1e-4


def test_failed_parity_leaves_no_output(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(onnx_export, "FP32_LOGIT_TOLERANCE", -1.0)
    with pytest.raises(onnx_export.OnnxParityError, match="nothing written"):
        onnx_export.export_onnx(tiny_qwen3(), tmp_path / "onnx", with_past=False)
    assert list(tmp_path.iterdir()) == []


def test_compiled_pruned_model_matches_eager() -> None:
    """fullgraph compile (no graph break) of a per-layer-count model; eager experts are refused with fullgraph."""
    model = tiny_qwen3()
    DropExperts(plan=_uneven(model))(model)
    with torch.no_grad():
        ref = model(input_ids=X).logits
        torch._dynamo.reset()
        got = moe_fx.compile(model)(input_ids=X).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(BadOptionError, match="fullgraph"):
        compile_model(model, experts_implementation="eager")
    with pytest.raises(MoeFxError, match="unknown experts implementation"):
        compile_model(model, experts_implementation="loop")
