"""Static decode graphs whose attention is onnxruntime's ``GroupQueryAttention`` node (``--attention gqa``): the cache
update and attention of a layer in one node, written in place through the runners' IO binding; layers the node
cannot express (MLA's compressed cache) kept on the model's ops with the reason; GPT-OSS's sinks and sliding windows
in the node; parity in float32 on
onnxruntime's CPU kernel; the runners' refusal of padded rows; the options' refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from onnx_cases import WINDOW, first_layer_pruned

from moe_fx.cli import main
from moe_fx.deliver.onnx import OnnxCausalLM, OnnxDecoder, StaticShape
from moe_fx.deliver.onnx import export as onnx_export
from moe_fx.errors import BadOptionError, MoeFxError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

CACHE = 40


def _gqa_export(once, family: str, **options):
    def build(tmp):
        model = first_layer_pruned(family)
        return model, onnx_export.export_onnx(model, tmp / "gqa", static=StaticShape(2, CACHE), attention="gqa", **options)

    return once(f"gqa-{family}-{sorted(options.items())}", build)


def _graph(path):
    import onnx_ir as ir

    return ir.load(str(path / "model.onnx")).graph


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe", "granitemoe", "gpt_oss"])
def test_each_layer_is_one_node_writing_its_cache(family: str, once) -> None:
    """Per-head norms (Qwen3), none (Mixtral), norms over the whole projection (OLMoE), a custom scale (GraniteMoE),
    sinks, projection biases, a half-width rotary and sliding windows (GPT-OSS):
    every layer's attention is one node that rotates q and k itself (the rotary ops and the position input leave the
    graph; the norms stay the model's), the cache's presents are its outputs over its pasts (what lets a runner bind
    both to one buffer), no scatter is left, the mask input is gone, and the logits stay within 1e-4 of PyTorch with
    greedy tokens identical."""
    model, result = _gqa_export(once, family)
    par = result.parity
    assert par.max_abs_logit_diff <= 1e-4 and par.greedy_identical and par.generated_tokens == 16
    config = model.config.get_text_config()
    layers = config.num_hidden_layers
    assert result.fused_attention == list(range(layers)) and result.unfused_attention == {}
    assert result.rotary_in_node == list(range(layers))
    past = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    assert result.inputs == ["input_ids", *past, "cache_position"]
    graph = _graph(result.path)
    nodes = [n for n in graph.all_nodes() if n.op_type == "GroupQueryAttention"]
    assert len(nodes) == layers and all(n.domain == "com.microsoft" for n in nodes)
    assert {n.attributes["num_heads"].value for n in nodes} == {config.num_attention_heads}
    assert {n.attributes["kv_num_heads"].value for n in nodes} == {config.num_key_value_heads}
    assert not {n.op_type for n in graph.all_nodes()} & {"Shape", "Attention", "Cos", "Sin"}
    assert not any(n.op_type == "ScatterElements" and n.inputs[0].name.startswith("past_key_values") for n in graph.all_nodes())
    assert {n.attributes.get_int("do_rotary", 0) for n in nodes} == {1}
    assert all(n.attributes["scale"].value == pytest.approx(model.model.layers[0].self_attn.scaling) for n in nodes)
    for out in graph.outputs[1:]:
        node = out.producer()
        slot = 3 if out.name.endswith(".key") else 4
        assert node.op_type == "GroupQueryAttention" and node.inputs[slot].name == out.name.replace("present", "past_key_values")
    record = json.loads((result.path / "moe_fx.json").read_text())["onnx_export"]
    assert record["fused_attention"] == list(range(layers))


def test_sinks_and_sliding_windows_go_into_the_node(once) -> None:
    """GPT-OSS: each layer's sinks are its node's ``head_sink``, a sliding layer's window its ``local_window_size``
    (6 tokens, crossed by the parity check's 28: its logits are within 1e-4 of PyTorch's), a full layer has none;
    every layer's cache holds all the graph's slots."""
    model, result = _gqa_export(once, "gpt_oss")
    assert result.parity.max_abs_logit_diff <= 1e-4 and result.parity.greedy_identical
    graph = _graph(result.path)
    nodes = [n for n in graph.all_nodes() if n.op_type == "GroupQueryAttention"]
    modules = [layer.self_attn for layer in model.model.layers]
    assert [m.sliding_window for m in modules] == [WINDOW, None]
    for node, module in zip(nodes, modules, strict=True):
        np.testing.assert_array_equal(node.inputs[11].const_value.numpy(), module.sinks.detach().numpy())
        assert node.attributes.get_int("local_window_size", -1) == (module.sliding_window or -1)
    assert {tuple(v.shape) for v in graph.inputs if v.name.startswith("past_key_values")} == {(2, 4, CACHE, 16)}


@pytest.mark.parametrize(("family", "reason"), [("deepseek_v3", "derived from the cache"), ("llama4", "chunked cache layer")])
def test_layers_the_node_cannot_express_keep_their_ops(family: str, reason: str, once) -> None:
    """DeepSeek's compressed (MLA) cache, and Llama 4's attention chunks, which its attention call does not name (the
    node would attend across them; 6-token chunks, crossed by the check): the decode-step probe keeps each layer on
    the model's own attention with the reason, and the graph matches PyTorch as before (scatter-written cache, mask
    input)."""
    model, result = _gqa_export(once, family)
    assert result.parity.max_abs_logit_diff <= 1e-4 and result.parity.greedy_identical
    layers = model.config.get_text_config().num_hidden_layers
    assert result.fused_attention == [] and sorted(result.unfused_attention) == list(range(layers))
    assert all(reason in why for why in result.unfused_attention.values())
    assert "attention_mask" in result.inputs
    assert not any(n.op_type == "GroupQueryAttention" for n in _graph(result.path).all_nodes())


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_decoder_runs_it_in_place_and_padding_is_refused(family: str, once) -> None:
    """OnnxDecoder (past and present bound to one buffer: the node's in-place mode) generates PyTorch's greedy tokens
    (GPT-OSS's past its window); the cache holds exactly the written slots. A
    padded batch is refused: the node takes no mask."""
    model, result = _gqa_export(once, family)
    ids = np.random.default_rng(0).integers(3, model.get_output_embeddings().weight.shape[0], (2, 9))
    with torch.no_grad():
        expected = model.generate(torch.tensor(ids), max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0).numpy()
    decoder = OnnxDecoder(result.path, device="cpu")
    np.testing.assert_array_equal(decoder.generate(ids, 10), expected)
    cache = next(iter(decoder.cache.values())).numpy()
    assert (np.abs(cache[:, :, :18]).max(axis=-1) > 0).all() and (cache[:, :, 18:] == 0).all()  # 9 + 9 steps
    runner = OnnxCausalLM(result.path, device="cpu")
    mask = np.ones((2, 9), np.int64)
    mask[1, :3] = 0
    with pytest.raises(MoeFxError, match="takes no padding mask: every row must hold the same number of tokens"):
        runner.forward(ids, mask, runner.empty_past(2))


def test_half_precision_graph_is_fused_by_default(tmp_path) -> None:
    """float16 (the CUDA kernel's case): without ``--attention`` every layer becomes the node, rotating q and k itself
    (the parity check of a float16 graph runs on the CUDA provider: onnxruntime's CPU MoE kernel is float32 only)."""
    model = first_layer_pruned("qwen3_moe").half()
    result = onnx_export.export_onnx(model, tmp_path / "h", static=StaticShape(1, CACHE), dtype="float16", check=False)
    assert result.fused_attention == [0, 1] and result.rotary_in_node == [0, 1] and result.unfused_attention == {}
    assert result.inputs[:2] == ["input_ids", "past_key_values.0.key"]


@pytest.mark.parametrize(("family", "norms"), [("qwen3_moe", [0, 1]), ("mixtral", [])])
def test_cuda_form_takes_the_per_head_norms_into_the_node(family: str, norms: list[int], tmp_path) -> None:
    """``--attention gqa-cuda``: where the probe finds that the node's own per-head RMS norms reproduce the layer
    (Qwen3's q/k norms), the node takes their weights and epsilon (``q_norm_weight``, ``k_norm_weight``: inputs 14
    and 15, the ones between left empty) and the norm ops leave the graph; a family without them keeps the
    portable form. (onnxruntime's CPU kernel refuses these inputs: the graph's parity is checked on CUDA, in
    :func:`test_cuda_kernel_matches_pytorch_in_float16`.)"""
    model = first_layer_pruned(family).half()
    result = onnx_export.export_onnx(model, tmp_path / "n", static=StaticShape(1, CACHE), dtype="float16", check=False, attention="gqa-cuda")
    assert result.fused_attention == [0, 1] and result.rotary_in_node == [0, 1] and result.norms_in_node == norms
    nodes = [n for n in _graph(result.path).all_nodes() if n.op_type == "GroupQueryAttention"]
    assert len(nodes) == 2
    for node in nodes:
        if norms:
            assert [v is None for v in node.inputs[9:14]] == [True] * 5 and node.inputs[14].shape.dims == node.inputs[15].shape.dims == (16,)
            assert node.attributes["qk_norm_epsilon"].value == pytest.approx(model.config.rms_norm_eps)
        else:
            assert len(node.inputs) == 9 and "qk_norm_epsilon" not in node.attributes
    if norms:  # the q/k norms' reductions left with them: only the layers' two norms and the final one remain
        ops = [n.op_type for n in _graph(result.path).all_nodes()]
        assert ops.count("ReduceMean") == 2 * model.config.num_hidden_layers + 1


def test_with_onnxruntime_fusions(once) -> None:
    """The combination: transformers' onnxruntime fusions (norms with their residual adds, the per-head norms, packed
    q/k/v projections) around the nodes, which keep the rotary embedding; still within 1e-4."""
    model, result = _gqa_export(once, "qwen3_moe", ort_fusions="cuda")
    assert result.parity.max_abs_logit_diff <= 1e-4 and result.parity.greedy_identical
    ops = [n.op_type for n in _graph(result.path).all_nodes()]
    layers = model.config.num_hidden_layers
    assert ops.count("GroupQueryAttention") == layers and "RotaryEmbedding" not in ops
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * layers  # each residual add with the norm after it
    assert ops.count("MatMul") == 2 * layers + 1  # q/k/v packed, o, a layer; the LM head


def test_float32_default_and_plain_keep_the_models_attention(tmp_path) -> None:
    """Without ``--attention``, a float32 graph keeps the model's attention (the node's CUDA kernel runs half
    precision only) and says so per layer; ``plain`` records nothing to fuse."""
    model = first_layer_pruned("qwen3_moe")
    default = onnx_export.export_onnx(model, tmp_path / "d", static=StaticShape(1, CACHE), check=False)
    assert default.fused_attention == [] and set(default.unfused_attention) == {0, 1}
    assert all("runs float16/bfloat16" in why for why in default.unfused_attention.values())
    plain = onnx_export.export_onnx(model, tmp_path / "p", static=StaticShape(1, CACHE), check=False, attention="plain")
    assert plain.fused_attention == [] and plain.unfused_attention == {} and "attention_mask" in plain.inputs


def test_attention_options_refused_before_export(capsys, micro_path, tmp_path) -> None:
    model = first_layer_pruned("qwen3_moe")
    with pytest.raises(BadOptionError, match="--attention gqa fuses a --static-cache graph's attention"):
        onnx_export.export_onnx(model, tmp_path / "a", attention="gqa")
    with pytest.raises(BadOptionError, match="--attention 'fast' is not one of gqa, gqa-cuda, plain"):
        onnx_export.export_onnx(model, tmp_path / "b", attention="fast", static=StaticShape(1, CACHE))
    with pytest.raises(BadOptionError, match="only onnxruntime's CUDA kernel runs, so the parity check cannot run on the CPU"):
        onnx_export.export_onnx(model.half(), tmp_path / "e", attention="gqa-cuda", static=StaticShape(1, CACHE), dtype="float16")
    assert main(["export", "onnx", str(micro_path), "--out", str(tmp_path / "c"), "--attention", "gqa"]) == 2
    assert "--attention gqa fuses a --static-cache graph's attention" in capsys.readouterr().err
    argv = ["export", "onnx", str(micro_path), "--out", str(tmp_path / "f"), "--static-cache", "48", "--dtype", "float16"]
    assert main([*argv, "--attention", "gqa-cuda"]) == 2
    assert "check on --device cuda, pass --no-check, or use --attention gqa" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_cli_gqa_export_of_the_trained_micro_model(capsys, micro_path, tmp_path) -> None:
    """The trained micro model (grouped heads, per-head norms) through the CLI: every layer fused, parity met."""
    out = tmp_path / "onnx"
    code = main(["export", "onnx", str(micro_path), "--out", str(out), "--static-cache", "48", "--attention", "gqa", "--quiet"])
    text, err = capsys.readouterr()
    assert code == 0, err
    assert "2 as com.microsoft.GroupQueryAttention (2 rotating q and k)" in text and "identical" in text
    assert json.loads((out / "moe_fx.json").read_text())["onnx_export"]["fused_attention"] == [0, 1]
    cuda_only = tmp_path / "cuda"  # the CUDA form, unchecked on this CPU: the summary names the layers with their norms
    argv = ["export", "onnx", str(micro_path), "--out", str(cuda_only), "--static-cache", "48", "--dtype", "float16", "--no-check"]
    assert main([*argv, "--attention", "gqa-cuda", "--quiet"]) == 0
    assert "2 as com.microsoft.GroupQueryAttention (2 rotating q and k, 2 with their q/k norms)" in capsys.readouterr()[0]
    assert json.loads((cuda_only / "moe_fx.json").read_text())["onnx_export"]["norms_in_node"] == [0, 1]


def test_cuda_kernel_matches_pytorch_in_float16(tmp_path) -> None:
    """On onnxruntime-gpu with a CUDA torch (scripts/test_gpu.sh): a float16 graph, checked on the CUDA provider by the
    export itself, fuses every layer by default, and its CUDA-graph replay generates what plain steps do; so does
    the ``gqa-cuda`` graph, whose nodes also apply the per-head norms."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available():
        pytest.skip("needs onnxruntime-gpu and a CUDA torch")
    model = first_layer_pruned("qwen3_moe").to("cuda", torch.float16)
    result = onnx_export.export_onnx(model, tmp_path / "gqa16", static=StaticShape(2, CACHE), dtype="float16", device="cuda")
    assert result.fused_attention == [0, 1] and result.parity.greedy_identical
    ids = np.random.default_rng(1).integers(3, 100, (2, 7))
    replayed, plain = (OnnxDecoder(result.path, device="cuda", cuda_graph=graph) for graph in (True, False))
    np.testing.assert_array_equal(replayed.generate(ids, 10), plain.generate(ids, 10))
    normed = onnx_export.export_onnx(model, tmp_path / "gqa16n", static=StaticShape(2, CACHE), dtype="float16", device="cuda",
                                     attention="gqa-cuda")  # the per-head norms in the node: checked by the export on CUDA
    assert normed.norms_in_node == [0, 1] and normed.parity.greedy_identical
    np.testing.assert_array_equal(OnnxDecoder(normed.path, device="cuda", cuda_graph=True).generate(ids, 10), plain.generate(ids, 10))


def test_cuda_kernel_takes_sinks_and_windows(tmp_path) -> None:
    """On onnxruntime-gpu (scripts/test_gpu.sh): GPT-OSS in float16, its sinks and 6-token window in the node, checked
    on the CUDA provider by the export itself past the window; the CUDA-graph replay generates what plain steps do."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available():
        pytest.skip("needs onnxruntime-gpu and a CUDA torch")
    model = first_layer_pruned("gpt_oss").to("cuda", torch.float16)
    result = onnx_export.export_onnx(model, tmp_path / "gpt", static=StaticShape(2, CACHE), dtype="float16", device="cuda")
    assert result.fused_attention == [0, 1] and result.rotary_in_node == [0, 1] and result.parity.greedy_identical
    ids = np.random.default_rng(1).integers(3, 100, (2, 7))
    replayed, plain = (OnnxDecoder(result.path, device="cuda", cuda_graph=graph) for graph in (True, False))
    np.testing.assert_array_equal(replayed.generate(ids, 10), plain.generate(ids, 10))


def test_probe_leaves_the_trace_sample_as_it_was() -> None:
    """The planning step runs one decode step on the trace's own sample and puts back what it wrote (no copy of the
    whole cache); the model's attention implementation is restored on exit."""
    from moe_fx.deliver.onnx.fused_attention import group_query_attention
    from moe_fx.deliver.onnx.static_decode import scatter_updates, static_sample_inputs

    model = first_layer_pruned("mixtral")
    with torch.no_grad(), scatter_updates():
        inputs = static_sample_inputs(model, StaticShape(2, CACHE))
    cache = inputs["past_key_values"]
    before = [(layer.keys.clone(), layer.values.clone(), layer.cumulative_length.clone()) for layer in cache.layers]
    implementation = model.config._attn_implementation
    with group_query_attention(model, inputs, every_dtype=True) as plan:
        assert plan.layers == {0: None, 1: None} and plan.rotary_in_node == [0, 1]
    assert model.config._attn_implementation == implementation
    for layer, (keys, values, count) in zip(cache.layers, before, strict=True):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values) and torch.equal(layer.cumulative_length, count)
