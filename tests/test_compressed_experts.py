"""int8-channel / int4-group expert checkpoints in compressed-tensors' format: written shard by shard with the
source untouched, loaded by stock transformers (with compressed-tensors) to exactly the library's decompressed
weights, per-layer expert counts, the saved config, refusals before anything is written, the CLI."""

from __future__ import annotations

import json
import re

import pytest
import torch
from test_families import kept_ids, tiny_model
from test_fp8_block import _state
from transformers import AutoModelForCausalLM

from moe_fx import PrunePlan
from moe_fx.cli import main
from moe_fx.errors import BadOptionError
from moe_fx.formats import save_checkpoint
from moe_fx.formats.compressed_experts import decode
from moe_fx.formats.quantized_checkpoint import quantize_checkpoint
from moe_fx.model.trace import trace
from moe_fx.passes import DropExperts

pytest.importorskip("compressed_tensors")

GROUP = 32
"""The tiny models' input sizes (64 and 32) take groups of 32."""


@pytest.mark.parametrize("scheme", ["int8-channel", "int4-group"])
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3", "qwen2_moe"])
def test_checkpoint_loads_in_stock_transformers(family: str, scheme: str, tmp_path) -> None:
    model = tiny_model(family).to(torch.bfloat16)
    spec = trace(model)
    DropExperts(plan=PrunePlan({spec.blocks[0].path: kept_ids(spec)}))(model)
    src = save_checkpoint(model, tmp_path / "src", report=False)
    before = _state(src)
    entry = quantize_checkpoint(src, tmp_path / "q", scheme=scheme, group_size=GROUP)
    assert all(torch.equal(t, before[k]) for k, t in _state(src).items())
    stored = _state(tmp_path / "q")
    experts = [k.removesuffix("_packed") for k in stored if ".experts." in k and k.endswith("weight_packed") and stored[k].dtype == torch.int32]
    assert len(experts) == entry["tensors"] > 0 and entry["bytes"] < entry["bytes_before"]
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    weights = config["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == (8 if scheme == "int8-channel" else 4) and weights["symmetric"]
    assert "lm_head" in config["ignore"] and all(b.router.path in config["ignore"] for b in spec.blocks)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.bfloat16, trust_remote_code=True)
    block = trace(loaded).blocks[0]
    module = loaded.get_submodule(block.experts.path)
    assert module.down_proj.shape[0] == len(kept_ids(spec))  # per-layer counts
    for e in range(block.num_experts):  # what loads is exactly the library's decompression of what is stored
        # the hub's names, not the module paths (Mixtral: block_sparse_moe.experts.N.w2)
        down = next(n for n in experts if re.search(rf"layers\.{block.layer_index}\..*experts\.{e}\.(down_proj|w2)\.weight$", n))
        torch.testing.assert_close(module.down_proj[e].float(), decode(scheme, GROUP, down, stored).to(torch.bfloat16).float(), rtol=0, atol=0)
    x = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (loaded(x).logits.float() - model(x).logits.float()).abs().max()
    assert 0 < diff < (0.1 if scheme == "int8-channel" else 0.3)


def test_refusals_before_writing(tmp_path) -> None:
    src = save_checkpoint(tiny_model("qwen3_moe").to(torch.bfloat16), tmp_path / "src", report=False)
    with pytest.raises(BadOptionError, match="not a multiple of int4-group.s group size 128"):
        quantize_checkpoint(src, tmp_path / "x", scheme="int4-group")
    with pytest.raises(BadOptionError, match="unknown quantization scheme 'int3'"):
        quantize_checkpoint(src, tmp_path / "y", scheme="int3")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli(capsys, tmp_path) -> None:
    src = save_checkpoint(tiny_model("mixtral").to(torch.bfloat16), tmp_path / "src", report=False)
    assert main(["quantize", str(src), "--scheme", "int4-group", "--group-size", str(GROUP), "--out", str(tmp_path / "q"), "--quiet"]) == 0
    assert "int4-group" in capsys.readouterr().out
    record = json.loads((tmp_path / "q" / "moe_fx.json").read_text())["quantization"]
    assert record["scheme"] == "int4-group" and record["group_size"] == GROUP
    assert main(["quantize", str(src), "--scheme", "int4-group", "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    assert "group size 128" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_load_into_quantized_experts(tmp_path) -> None:
    """``stored_scheme`` names the in-memory scheme of a checkpoint's stored format (int4 only at groups of 128);
    ``load_model(quantize=...)`` re-quantizes the dequantized load: the codes come back, so its logits stay within
    bfloat16 rounding of the dequantized model's."""
    from moe_fx.formats.loading import load_model, stored_scheme

    src = save_checkpoint(tiny_model("qwen3_moe").to(torch.bfloat16), tmp_path / "src", report=False)
    quantize_checkpoint(src, tmp_path / "int8", scheme="int8-channel")
    quantize_checkpoint(src, tmp_path / "int4", scheme="int4-group", group_size=GROUP)
    assert stored_scheme(tmp_path / "int8") == "int8-channel" and stored_scheme(tmp_path / "int4") is None and stored_scheme(src) is None
    dense = load_model(tmp_path / "int8", quantize=None)
    quantized = load_model(tmp_path / "int8", quantize="int8-channel")
    x = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(quantized(x).logits.float(), dense(x).logits.float(), rtol=0, atol=2e-2)


def test_cli_prune_quantize_int(capsys, micro_path, tmp_path) -> None:
    """``prune --quantize int8-channel`` writes a checkpoint stock transformers loads; int4-group with an expert
    size its group does not divide is refused before loading (nothing written)."""
    out = tmp_path / "pruned-int8"
    assert main(["prune", str(micro_path), "--out", str(out), "--method", "random", "--ratio", "0.5", "--quantize", "int8-channel",
                 "--calib-tokens", "2000", "--no-eval", "--quiet"]) == 0, capsys.readouterr().err
    assert json.loads((out / "moe_fx.json").read_text())["quantization"]["scheme"] == "int8-channel"
    with torch.no_grad():
        assert torch.isfinite(AutoModelForCausalLM.from_pretrained(out)(torch.randint(3, 100, (1, 8))).logits).all()
    capsys.readouterr()
    assert main(["prune", str(micro_path), "--out", str(tmp_path / "x"), "--method", "random", "--ratio", "0.5", "--quantize", "int4-group",
                 "--quiet"]) == 2
    assert "group size 128" in capsys.readouterr().err and not (tmp_path / "x").exists()
