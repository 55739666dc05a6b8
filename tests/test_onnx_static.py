"""Static decode graphs (``--static-cache``): one token a step, fixed batch and cache length, no shape computations
(what onnxruntime's CUDA graphs need), fused MoE nodes, the cache written by one ``ScatterElements`` per tensor;
the parity check stepping them token by token, and :class:`OnnxDecoder` running them with the cache updated in
place through IO binding (the CPU here; the CUDA graph replay is the same binding, run in benchmarks/onnx_gpu.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from onnx_cases import first_layer_pruned
from tiny_models import tiny_model as build_tiny

from moe_fx.cli import main
from moe_fx.deliver.onnx import OnnxCausalLM, OnnxDecoder, StaticShape
from moe_fx.deliver.onnx import export as onnx_export
from moe_fx.errors import BadOptionError, MoeFxError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "qwen2_moe"]
"""Plain static layers, MLA-free and MLA-like caches, shared experts, and GPT-OSS's sliding-window layers (a 6-token
window in the 40-slot cache: the window's layers hold every slot, the window is the mask's)."""
CACHE = 40


def _static_export(once, family: str, batch: int = 2):
    def build(tmp):
        model = first_layer_pruned(family)
        return model, onnx_export.export_onnx(model, tmp / "static", static=StaticShape(batch, CACHE))

    return once(f"static-{family}-{batch}", build)


def _graph(path):
    import onnx_ir as ir

    return ir.load(str(path / "model.onnx")).graph


@pytest.mark.parametrize("family", FAMILIES)
def test_static_graph_matches_and_has_no_shape_ops(family: str, once) -> None:
    """Per-layer expert counts, fused MoE nodes, fixed shapes everywhere, logits within 1e-4 stepping token by token,
    and each present a ScatterElements of its past (what lets the decoder bind both to one buffer)."""
    model, result = _static_export(once, family)
    par = result.parity
    assert par.max_abs_logit_diff <= 1e-4 and par.greedy_identical and par.generated_tokens == 16
    assert result.fused_blocks and not result.unfused_blocks
    assert result.static == StaticShape(2, CACHE)
    layers = model.config.get_text_config().num_hidden_layers
    past = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    assert result.inputs == ["input_ids", "attention_mask", "position_ids", *past, "cache_position"]
    assert result.outputs == ["logits", *[n.replace("past_key_values", "present") for n in past]]
    graph = _graph(result.path)
    ops = {node.op_type for node in graph.all_nodes()}
    assert not ops & {"Shape", "Size", "NonZero"} and "MoE" in ops
    for value in [*graph.inputs, *graph.outputs]:
        assert all(isinstance(d, int) for d in value.shape), value
    for out in graph.outputs[1:]:
        node = out.producer()
        assert node.op_type == "ScatterElements" and node.inputs[0].name == out.name.replace("present", "past_key_values")
    assert json.loads((result.path / "moe_fx.json").read_text())["onnx_export"]["static"] == {"batch_size": 2, "max_cache_len": CACHE}


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_decoder_generates_what_pytorch_does(family: str, once) -> None:
    """OnnxDecoder (IO binding, the cache in place) generates PyTorch's greedy tokens for a full batch and for fewer
    rows, and its logits after the prompt are PyTorch's; the cache holds the written slots only."""
    model, result = _static_export(once, family)
    ids = np.random.default_rng(0).integers(3, model.get_output_embeddings().weight.shape[0], (2, 9))
    decoder = OnnxDecoder(result.path, device="cpu")
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        expected = model.generate(torch.tensor(ids), max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0).numpy()
        logits = model(torch.tensor(ids)).logits[:, -1].numpy()
    assert eos is None or not np.isin(expected[:, 9:], eos).any()
    np.testing.assert_array_equal(decoder.generate(ids, 12), expected)
    np.testing.assert_array_equal(decoder.generate(ids[1:], 12), expected[1:])
    decoder.reset()
    for column in range(ids.shape[1]):
        decoder.step(ids[:, column])
    assert np.abs(decoder.last_logits() - logits).max() <= 1e-4
    cache = next(iter(decoder.cache.values())).numpy()  # written in place: the bound buffer itself
    assert (np.abs(cache[:, :, :20]).max(axis=-1) > 0).all()  # generate stepped 9 + 11 tokens
    assert (cache[:, :, 20:] == 0).all()


def test_decoder_and_runner_refuse_what_the_graph_cannot_hold(once, tmp_path) -> None:
    _, result = _static_export(once, "qwen3_moe")
    decoder = OnnxDecoder(result.path, device="cpu")
    with pytest.raises(MoeFxError, match="runs 2 rows over a 40-token cache"):
        decoder.generate(np.ones((3, 4), np.int64), 4)
    with pytest.raises(MoeFxError, match="asked for 1 rows of 30 \\+ 20 tokens"):
        decoder.generate(np.ones((1, 30), np.int64), 20)
    decoder.length = CACHE
    with pytest.raises(MoeFxError, match="cache holds 40 tokens and is full"):
        decoder.step(np.ones(2, np.int64))
    with pytest.raises(MoeFxError, match="got 1 rows and 41 tokens"):
        OnnxCausalLM(result.path, device="cpu").forward(np.ones((1, 41), np.int64), np.ones((1, 41), np.int64), None)
    dynamic = onnx_export.export_onnx(first_layer_pruned("qwen3_moe"), tmp_path / "dynamic", check=False)
    with pytest.raises(BadOptionError, match="dynamic-shape export; OnnxDecoder runs static decode graphs"):
        OnnxDecoder(dynamic.path, device="cpu")


def test_static_options_refused_before_export(tmp_path) -> None:
    model = first_layer_pruned("qwen3_moe")
    with pytest.raises(BadOptionError, match="--static-cache 8 is too short"):
        StaticShape(1, 8)
    with pytest.raises(BadOptionError, match="--batch-size 0"):
        StaticShape(0, 64)
    with pytest.raises(BadOptionError, match="drop --no-past"):
        onnx_export.export_onnx(model, tmp_path / "a", with_past=False, static=StaticShape(1, 64))
    with pytest.raises(BadOptionError, match="LinearAttentionLayer.*not a fixed-slot key/value cache"):
        onnx_export.export_onnx(build_tiny("lfm2_moe").float(), tmp_path / "d", static=StaticShape(1, 40))  # hybrid: convolution states
    assert not any(tmp_path.iterdir())


def test_cli_static_export(capsys, micro_path, tmp_path) -> None:
    out = tmp_path / "onnx"
    code = main(["export", "onnx", str(micro_path), "--out", str(out), "--static-cache", "48", "--batch-size", "2", "--quiet"])
    text, err = capsys.readouterr()
    assert code == 0, err
    assert "static decode graph" in text and "batch 2, 48-token cache" in text and "identical" in text and "opset 20," in text  # transformers' exporter default
    assert json.loads((out / "moe_fx.json").read_text())["onnx_export"]["static"] == {"batch_size": 2, "max_cache_len": 48}
    assert main(["export", "onnx", str(micro_path), "--out", str(tmp_path / "x"), "--batch-size", "4"]) == 2
    assert "fixes the batch of a --static-cache graph" in capsys.readouterr().err
    assert main(["export", "onnx", str(micro_path), "--out", str(tmp_path / "x"), "--static-cache", "16"]) == 2
    assert "--static-cache 16 is too short" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_benchmark_static_phase_runs_on_cpu(tmp_path) -> None:
    """benchmarks/onnx_gpu.py --phase static at tiny shapes on the CPU (the GPU run is the same code, CUDA graphs aside):
    PyTorch's row, then a fused and an int4 static graph exported, checked, timed, profiled and deleted."""
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    out = tmp_path / "static.json"
    argv = ["onnx_gpu.py", "--phase", "static", "--tiny", "--layers", "1", "--device", "cpu", "--dtype", "float32", "--variants", "experts-50%",
            "--static", "fused:2", "fused-int4:1", "--batches", "1", "2", "--prompt", "24", "--repeats", "2", "--steps", "2",
            "--dir", str(tmp_path / "exports"), "--out", str(out), "--profile"]
    proc = subprocess.run([sys.executable, *argv], cwd=bench, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["experts-50%/torch moe_fx eager", "experts-50%/onnx fused static", "experts-50%/onnx fused-int4 static"]
    row = results["experts-50%/onnx fused static"]["b2"]
    assert row["parity"]["greedy_identical"] and row["cuda_graph_greedy_identical"] is True and row["decode_ms"] > 0
    assert results["experts-50%/onnx fused-int4 static"]["b1"]["quantization"]["max_abs_logit_diff"] > 0
    assert not any((tmp_path / "exports").rglob("model.onnx"))
    assert "PyTorch ms / this" in proc.stdout
    assert "experts-50%/fused b2: onnxruntime" in proc.stdout  # --profile: the replayed steps' top operators


def test_cuda_graph_decoder_matches_the_cpu(once) -> None:
    """On onnxruntime-gpu: the step replayed as a CUDA graph generates the CPU's tokens, with logits within float32
    rounding of the CPU's (scripts/test_gpu.sh; skipped where onnxruntime has no CUDA provider)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA execution provider here (onnxruntime-gpu)")
    _, result = _static_export(once, "qwen3_moe")
    ids = np.random.default_rng(1).integers(3, 100, (2, 7))
    cpu, gpu = OnnxDecoder(result.path, device="cpu"), OnnxDecoder(result.path, device="cuda", cuda_graph=True)
    np.testing.assert_array_equal(gpu.generate(ids, 10), cpu.generate(ids, 10))
    np.testing.assert_array_equal(gpu.generate(ids[:1], 10), cpu.generate(ids[:1], 10))  # the captured graph, replayed again
    assert np.abs(gpu.last_logits() - cpu.last_logits()).max() <= 1e-3


@pytest.mark.parametrize("static", [True, False])
def test_opset23_attention_reads_the_cache_itself(static: bool, micro_path, tmp_path) -> None:
    """At opset 23 attention is ONNX's ``Attention`` node on the cache's own (fewer) key/value heads: no ``repeat_kv``
    copy of the cache, and the same logits (static and dynamic exports; the micro model has grouped heads)."""
    from moe_fx.formats.loading import load_model

    model = load_model(micro_path, dtype="float32", device="cpu", quantize=None, ragged=False)
    config = model.config
    assert config.num_key_value_heads < config.num_attention_heads
    result = onnx_export.export_onnx(model, tmp_path / "o23", opset=23, static=StaticShape(1, CACHE) if static else None)
    assert result.parity.max_abs_logit_diff <= 1e-4 and result.parity.greedy_identical and result.opset == 23
    graph = _graph(result.path)
    attention = [n for n in graph.all_nodes() if n.op_type == "Attention"]
    assert len(attention) == config.num_hidden_layers
    for node in attention:
        for value in node.inputs[1:3]:  # key and value: the cache as written, at its own head count
            assert value.producer().op_type in ("ScatterElements", "Concat") and value.shape[1] == config.num_key_value_heads
    assert "TRANSFORMERS_SDPA_FORCE_GQA" not in __import__("os").environ
