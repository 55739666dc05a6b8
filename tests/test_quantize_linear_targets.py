"""``targets="linear"`` (``moe-fx quantize --targets linear``, ``prune --quantize-targets linear``): every linear
layer but the routers and the LM head quantized too, as the hub's FP8 checkpoints store attention; stock
transformers and ``moe_fx.load`` read it; refusals before any work."""

from __future__ import annotations

import json

import pytest
import torch
from test_families import tiny_model
from test_fp8_block import _state
from transformers import AutoModelForCausalLM

import moe_fx
from moe_fx.cli import main
from moe_fx.errors import BadOptionError
from moe_fx.formats import save_checkpoint
from moe_fx.formats.fp8_block import SCALE_SUFFIX, dequantize
from moe_fx.formats.quantized_checkpoint import plan_tensors, quantize_checkpoint
from moe_fx.model.trace import trace

pytest.importorskip("accelerate")  # transformers' FP8 loading needs it

GROUP = 32
"""The tiny models' input sizes take groups of 32."""


def _quantized_keys(stored: dict[str, torch.Tensor]) -> set[str]:
    """The weights stored quantized, under the module's ``weight`` name: FP8 codes, or packed integers."""
    fp8 = {k for k, t in stored.items() if t.dtype == torch.float8_e4m3fn}
    packed = {k.removesuffix("_packed") for k in stored if k.endswith("weight_packed")}
    return fp8 | packed


@pytest.mark.parametrize("scheme", ["fp8-block", "int8-channel", "int4-group"])
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "qwen2_moe"])
def test_linear_targets_load_in_stock_transformers_and_moe_fx(family: str, scheme: str, tmp_path) -> None:
    if scheme != "fp8-block":
        pytest.importorskip("compressed_tensors")
    model = tiny_model(family).to(torch.bfloat16)
    spec = trace(model)
    src = save_checkpoint(model, tmp_path / "src", report=False)
    experts_only = quantize_checkpoint(src, tmp_path / "experts", scheme=scheme, group_size=GROUP)
    entry = quantize_checkpoint(src, tmp_path / "linear", scheme=scheme, group_size=GROUP, targets="linear")
    stored = _state(tmp_path / "linear")
    quantized = _quantized_keys(stored)
    assert entry["targets"] == "linear" and len(quantized) == entry["tensors"] > experts_only["tensors"]
    assert entry["bytes"] < experts_only["bytes"]
    assert any("self_attn" in k for k in quantized) and not any("lm_head" in k or k.startswith("model.embed") for k in quantized)
    assert not any(k.startswith(b.router.path + ".") for b in spec.blocks for k in quantized)  # routers keep their dtype
    config = json.loads((tmp_path / "linear" / "config.json").read_text())["quantization_config"]
    kept = config.get("modules_to_not_convert", config.get("ignore"))
    assert "lm_head" in kept and all(b.router.path in kept for b in spec.blocks)
    assert not any(k.removesuffix(".weight") in kept for k in quantized)  # kept = what is not quantized (int4: MLA's 16-wide inputs)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "linear", dtype=torch.bfloat16, trust_remote_code=True)
    if scheme == "fp8-block":  # the attention weights loaded are exactly the stored codes times their scales
        q = next(k for k in quantized if "self_attn" in k)
        torch.testing.assert_close(loaded.state_dict()[q], dequantize(stored[q], stored[q + SCALE_SUFFIX], torch.bfloat16), rtol=0, atol=0)
    x = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stock = loaded(x).logits.float()
        ours = moe_fx.load(tmp_path / "linear", dtype="bfloat16")(x).logits.float()
        reference = model(x).logits.float()
    assert 0 < (stock - reference).abs().max() < (0.3 if scheme == "int4-group" else 0.15)
    torch.testing.assert_close(ours, stock, rtol=0, atol=2e-2)


def test_fp8_refuses_expert_blocks_transformers_cannot_read(tmp_path) -> None:
    """transformers derives FP8 blocks from the scale grid: an expert dimension over 128 not a multiple of it is
    refused (before writing), while a linear layer of such a shape keeps the source dtype."""
    model = tiny_model("qwen3_moe")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expert = next(k for k in shapes if ".experts." in k)
    per_expert = {k: v for k, v in shapes.items() if ".experts." not in k}
    per_expert |= {f"{expert.rsplit('.', 1)[0]}.0.down_proj.weight": (200, 64)}
    with pytest.raises(BadOptionError, match="not a multiple.*prune the source with --quantize fp8-block"):
        plan_tensors(model, per_expert, "fp8-block")
    per_expert[f"{expert.rsplit('.', 1)[0]}.0.down_proj.weight"] = (64, 64)
    attention = next(k for k in shapes if k.endswith("self_attn.q_proj.weight"))
    per_expert[attention] = (200, 64)
    chosen, kept = plan_tensors(model, per_expert, "fp8-block", "linear")
    assert attention not in chosen and attention.removesuffix(".weight") in kept
    chosen, _ = plan_tensors(model, per_expert, "int8-channel", "linear")
    assert attention in chosen


def test_cli_prune_with_linear_targets(capsys, micro_path, tmp_path) -> None:
    out = tmp_path / "pruned"
    code = main(["prune", str(micro_path), "--out", str(out), "--method", "random", "--ratio", "0.5", "--quantize", "fp8-block",
                 "--quantize-targets", "linear", "--calib-tokens", "2000", "--no-eval", "--quiet"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "moe_fx.json").read_text())["quantization"]
    assert record["targets"] == "linear"
    in_memory = _state(out)
    assert any("self_attn" in k for k in _quantized_keys(in_memory))
    streamed = tmp_path / "streamed"  # quantized in place after streaming: the same tensors
    assert main(["prune", str(micro_path), "--out", str(streamed), "--stream", "on", "--method", "random", "--ratio", "0.5", "--quantize",
                 "fp8-block", "--quantize-targets", "linear", "--calib-tokens", "2000", "--no-eval", "--quiet"]) == 0
    from_stream = _state(streamed)
    assert in_memory.keys() == from_stream.keys()
    assert all(torch.equal(t.view(torch.uint8), from_stream[k].view(torch.uint8)) if t.dtype == torch.float8_e4m3fn else torch.equal(t, from_stream[k])
               for k, t in in_memory.items())
    capsys.readouterr()
    code = main(["prune", str(micro_path), "--out", str(tmp_path / "x"), "--ratio", "0.5", "--quantize-targets", "linear", "--no-eval", "--quiet"])
    assert code == 2 and "add --quantize" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        main(["quantize", str(out), "--targets", "everything", "--out", str(tmp_path / "y")])


@pytest.mark.parametrize("scheme", ["fp8-block", "int4-group"])
def test_head_target_quantizes_an_untied_head_only(scheme: str, tmp_path) -> None:
    """``linear+head``: the LM head too, loaded by stock transformers and ``moe_fx.load``; a head tied to the
    embeddings keeps the source dtype (quantizing it would quantize the embedding table)."""
    if scheme != "fp8-block":
        pytest.importorskip("compressed_tensors")
    model = tiny_model("qwen3_moe").to(torch.bfloat16)
    src = save_checkpoint(model, tmp_path / "src", report=False)
    linear = quantize_checkpoint(src, tmp_path / "linear", scheme=scheme, group_size=GROUP, targets="linear")
    entry = quantize_checkpoint(src, tmp_path / "head", scheme=scheme, group_size=GROUP, targets="linear+head")
    quantized = _quantized_keys(_state(tmp_path / "head"))
    assert "lm_head.weight" in quantized and entry["tensors"] == linear["tensors"] + 1 and entry["bytes"] < linear["bytes"]
    config = json.loads((tmp_path / "head" / "config.json").read_text())["quantization_config"]
    assert "lm_head" not in config.get("modules_to_not_convert", config.get("ignore"))
    x = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / "head", dtype=torch.bfloat16)(x).logits.float()
        ours = moe_fx.load(tmp_path / "head", dtype="bfloat16")(x).logits.float()
        reference = model(x).logits.float()
    assert 0 < (stock - reference).abs().max() < (0.3 if scheme == "int4-group" else 0.15)
    torch.testing.assert_close(ours, stock, rtol=0, atol=2e-2)

    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.get_input_embeddings().weight
    tied = save_checkpoint(model, tmp_path / "tied", report=False)
    quantize_checkpoint(tied, tmp_path / "tied-head", scheme=scheme, group_size=GROUP, targets="linear+head")
    assert not any("lm_head" in k or "embed" in k for k in _quantized_keys(_state(tmp_path / "tied-head")))


def test_float32_fp8_checkpoint_loads_in_the_dtype_asked(tmp_path) -> None:
    """A float32 checkpoint with FP8 attention loads through ``moe_fx.load`` in bfloat16 with every weight in
    bfloat16 (transformers' dequantizing FP8 loader leaves the unquantized layers in float32) and runs."""
    model = tiny_model("mixtral")
    src = save_checkpoint(model, tmp_path / "src", report=False)
    quantize_checkpoint(src, tmp_path / "fp8", scheme="fp8-block", targets="linear")
    loaded = moe_fx.load(tmp_path / "fp8", dtype="bfloat16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    x = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = loaded(x).logits.float(), model(x).logits.float()
    assert (got - want).abs().max() < 0.15
