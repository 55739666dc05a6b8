"""Block-wise FP8 experts in the hub's format: the quantizer, the checkpoint that stock transformers loads (on the
CPU it dequantizes), per-layer expert counts, the CLI (`moe-fx quantize`, `moe-fx prune --quantize`), refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_families import kept_ids, tiny_model
from tiny_models import tiny_checkpoint
from transformers import AutoModelForCausalLM

import moe_fx
from moe_fx import PrunePlan
from moe_fx.cli import main
from moe_fx.errors import BadOptionError
from moe_fx.formats import save_checkpoint
from moe_fx.formats.fp8_block import BLOCK, SCALE_SUFFIX, dequantize, quantize
from moe_fx.formats.quantized_checkpoint import quantize_checkpoint
from moe_fx.kernels.quantized import FP8_MAX
from moe_fx.model.trace import trace
from moe_fx.passes import DropExperts

pytest.importorskip("accelerate")  # transformers' FP8 loading needs it


def _state(path) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def test_quantize_blocks() -> None:
    """One scale per 128 x 128 block (partial edge blocks too), codes within the format's range, a zero block
    stays zero, and the round trip is within e4m3's precision of each block's largest value."""
    w = torch.randn(200, 300, generator=torch.Generator().manual_seed(0))
    w[:BLOCK, :BLOCK] = 0
    codes, scale = quantize(w)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == w.shape and scale.shape == (2, 3)
    assert codes.float().abs().max() <= FP8_MAX and scale[0, 0] == 0
    back = dequantize(codes, scale)
    assert torch.all(back[:BLOCK, :BLOCK] == 0)
    step = scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:200, :300] * FP8_MAX / 8  # 3 mantissa bits
    assert torch.all((back - w).abs() <= step)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3", "qwen2_moe"])
def test_checkpoint_loads_in_stock_transformers(family: str, tmp_path) -> None:
    """Per-layer expert counts, saved, quantized: the source is untouched; stock ``from_pretrained`` loads every
    tensor not stored in FP8 as the source's; linear layers and routers are listed as kept."""
    model = tiny_model(family).to(torch.bfloat16)
    spec = trace(model)
    DropExperts(plan=PrunePlan({spec.blocks[0].path: kept_ids(spec)}))(model)
    src = save_checkpoint(model, tmp_path / "src", report=False)
    before = _state(src)
    entry = quantize_checkpoint(src, tmp_path / "fp8")
    assert all(torch.equal(t, before[k]) for k, t in _state(src).items())
    stored = _state(tmp_path / "fp8")
    experts = [k for k in stored if k.endswith(".weight") and stored[k].dtype == torch.float8_e4m3fn]
    assert len(experts) == entry["tensors"] > 0 and all(k + SCALE_SUFFIX in stored for k in experts)
    assert entry["bytes"] < entry["bytes_before"] == sum(t.numel() * t.element_size() for t in before.values())
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "fp8" and config["weight_block_size"] == [BLOCK, BLOCK]
    kept = config["modules_to_not_convert"]
    assert "lm_head" in kept and all(b.router.path in kept for b in spec.blocks) and any("self_attn" in k for k in kept)
    assert all(".experts." in k for k in experts)  # routed experts only: linear layers keep the source dtype
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16, trust_remote_code=True)
    assert loaded.get_submodule(spec.blocks[0].experts.path).down_proj.shape[0] == len(kept_ids(spec))  # per-layer counts
    loaded_state = loaded.state_dict()
    reference = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, trust_remote_code=True).state_dict()
    for name, tensor in loaded_state.items():
        if name in stored and stored[name].dtype != torch.float8_e4m3fn:
            assert torch.equal(tensor, reference[name]), name  # what is not stored in FP8 is the source's
        elif name in stored:
            torch.testing.assert_close(tensor, dequantize(stored[name], stored[name + SCALE_SUFFIX], tensor.dtype), rtol=0, atol=0)
    x = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (loaded(x).logits.float() - model(x).logits.float()).abs().max()
    assert 0 < diff < 0.1


FP8_PATH = r"""
import json, sys
import torch
from safetensors.torch import load_file
torch.cuda.is_available = lambda: True  # transformers' FP8 path (FP8Experts), which a CPU-only machine dequantizes
torch.cuda.get_device_capability = lambda *a: (9, 0)
from transformers import AutoModelForCausalLM
path, blocks = sys.argv[1], json.loads(sys.argv[2])
model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, trust_remote_code=True, output_loading_info=True)
assert not any(info.values()), info
stored = {}
for f in sorted(__import__("pathlib").Path(path).glob("*.safetensors")):
    stored.update(load_file(f))
for block, count in blocks.items():
    experts = model.get_submodule(block + ".experts")
    assert type(experts).__name__ == "FP8Experts", type(experts)
    codes = [t for n, t in experts.named_parameters() if t.dtype == torch.float8_e4m3fn]
    assert codes and all(t.shape[0] == count for t in experts.parameters()), (block, [t.shape for t in experts.parameters()])
    layer = block.rpartition(".")[0] + "."  # stored in the hub's names (Mixtral: block_sparse_moe.experts.N.w1)
    mine = [t for n, t in stored.items() if n.startswith(layer) and ".experts." in n and t.dtype == torch.float8_e4m3fn]
    checksum = lambda ts: sum(int(t.view(torch.uint8).long().sum()) for t in ts)
    assert checksum(codes) == checksum(mine) > 0, block  # the stored codes, not a re-initialised tensor
print("ok")
"""


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe", "deepseek_v3"])
def test_per_layer_checkpoint_loads_in_transformers_fp8_path(family: str, tmp_path) -> None:
    """transformers' FP8 loader (the GPU path, forced on this CPU in a subprocess) replaces each experts module by
    ``FP8Experts(module.config)``: per-layer expert counts load (they failed with a size mismatch when every block
    was sized at the config's one count), with the stored codes."""
    import subprocess
    import sys

    model = tiny_model(family).to(torch.bfloat16)
    spec = trace(model)
    DropExperts(plan=PrunePlan({spec.blocks[0].path: kept_ids(spec)}))(model)
    src = save_checkpoint(model, tmp_path / "src", report=False)
    quantize_checkpoint(src, tmp_path / "fp8")
    counts = {b.path: (len(kept_ids(spec)) if i == 0 else b.num_experts) for i, b in enumerate(spec.blocks)}
    assert len(set(counts.values())) == 2  # per-layer counts
    done = subprocess.run([sys.executable, "-c", FP8_PATH, str(tmp_path / "fp8"), json.dumps(counts)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_dequantized_experts_are_what_transformers_computes(tmp_path) -> None:
    model = tiny_model("qwen3_moe").to(torch.bfloat16)
    src = save_checkpoint(model, tmp_path / "src", report=False)
    quantize_checkpoint(src, tmp_path / "fp8")
    stored = _state(tmp_path / "fp8")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", dtype=torch.float32)
    experts = loaded.get_submodule(trace(loaded).blocks[0].experts.path)
    prefix = trace(loaded).blocks[0].experts.path
    gate = dequantize(stored[f"{prefix}.1.gate_proj.weight"], stored[f"{prefix}.1.gate_proj.weight{SCALE_SUFFIX}"])
    up = dequantize(stored[f"{prefix}.1.up_proj.weight"], stored[f"{prefix}.1.up_proj.weight{SCALE_SUFFIX}"])
    torch.testing.assert_close(experts.gate_up_proj[1], torch.cat([gate, up]), rtol=1e-2, atol=1e-3)


def test_cli_quantize(capsys, tmp_path) -> None:
    src = save_checkpoint(tiny_model("mixtral").to(torch.bfloat16), tmp_path / "src", report=False)
    assert main(["quantize", str(src), "--out", str(tmp_path / "fp8"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "(experts;" in out and "x)" in out
    assert json.loads((tmp_path / "fp8" / "moe_fx.json").read_text())["quantization"]["scheme"] == "fp8-block"
    assert main(["inspect", str(tmp_path / "fp8")]) == 0  # inspect loads it dequantized, and says how it is stored
    assert "stored weights: fp8-block (routed experts)" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "fp8"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stored_weights"] == "fp8-block (routed experts)"


def test_refusals(tmp_path) -> None:
    """Fused on-disk experts (GPT-OSS's MXFP4 layout, GraniteMoE's) and an already quantized checkpoint are refused,
    the fused experts' stored tensors named; no output."""
    gpt = save_checkpoint(tiny_model("gpt_oss").to(torch.bfloat16), tmp_path / "gpt", report=False)
    with pytest.raises(BadOptionError, match=r"stores its experts fused \(model.layers.0.mlp.experts.down_proj, "):
        quantize_checkpoint(gpt, tmp_path / "x")
    granite = save_checkpoint(tiny_model("granitemoe").to(torch.bfloat16), tmp_path / "granite", report=False)
    with pytest.raises(BadOptionError, match=r"stores its experts fused \(model.layers.0.block_sparse_moe.input_linear.weight, "):
        quantize_checkpoint(granite, tmp_path / "x")
    src = save_checkpoint(tiny_model("qwen3_moe").to(torch.bfloat16), tmp_path / "src", report=False)
    fp8 = tmp_path / "fp8"
    quantize_checkpoint(src, fp8)
    with pytest.raises(BadOptionError, match="already quantized"):
        quantize_checkpoint(fp8, tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_prune_then_quantize(capsys, micro_path, tmp_path) -> None:
    """`moe-fx prune --quantize fp8-block` writes FP8 experts that moe_fx.load and stock transformers load alike;
    an already quantized checkpoint is refused; a streamed prune with --quantize writes the same tensors."""
    out = tmp_path / "pruned-fp8"
    code = main(["prune", str(micro_path), "--out", str(out), "--method", "random", "--ratio", "0.5", "--quantize", "fp8-block",
                 "--calib-tokens", "2000", "--no-eval", "--quiet"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "moe_fx.json").read_text())
    assert record["quantization"]["scheme"] == "fp8-block" and record["quantization"]["bytes"] < record["quantization"]["bytes_before"]
    x = torch.randint(3, 100, (1, 8))
    with torch.no_grad():
        a = moe_fx.load(out)(x).logits
        b = AutoModelForCausalLM.from_pretrained(out)(x).logits
    torch.testing.assert_close(a, b)
    capsys.readouterr()
    assert main(["quantize", str(out), "--out", str(tmp_path / "again")]) == 2
    assert "already quantized" in capsys.readouterr().err
    streamed = tmp_path / "streamed-fp8"
    assert main(["prune", str(micro_path), "--out", str(streamed), "--stream", "on", "--method", "random", "--ratio", "0.5", "--quantize",
                 "fp8-block", "--calib-tokens", "2000", "--no-eval", "--quiet"]) == 0, capsys.readouterr().err
    record = json.loads((streamed / "moe_fx.json").read_text())
    assert record["quantization"]["scheme"] == "fp8-block" and "streaming" in record
    in_memory, from_stream = _state(out), _state(streamed)
    assert in_memory.keys() == from_stream.keys()
    assert all(torch.equal(t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t,
                           from_stream[k].view(torch.uint8) if t.dtype == torch.float8_e4m3fn else from_stream[k]) for k, t in in_memory.items())
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging directory left behind


def test_channel_prune_keeps_whole_fp8_blocks(capsys, micro_path, calib_path, tmp_path) -> None:
    """`prune --granularity channel --quantize fp8-block` on experts wider than a block: the widths are planned in
    whole 128-channel blocks (a width between blocks would be refused by the writer after all the work), a ratio
    the blocks round to nothing is refused before calibration, and the checkpoint loads in stock transformers
    as moe_fx runs it; a model under one block (the micro model, hidden size 64) is written with a note that
    transformers' GPU FP8 kernels refuse its partial blocks."""
    import subprocess
    import sys

    src = tiny_checkpoint("qwen3_moe", tmp_path / "src", tokenizer_from=micro_path, hidden_size=128, moe_intermediate_size=384)
    argv = ["prune", str(src), "--granularity", "channel", "--method", "activation", "--quantize", "fp8-block", "--calib", str(calib_path),
            "--calib-tokens", "1000", "--no-eval", "--device", "cpu"]
    assert main([*argv, "--ratio", "0.1", "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "384 channels in steps of 128 keeps them all" in err and not (tmp_path / "none").exists()
    for allocation in ("uniform", "layer", "expert"):
        out = tmp_path / allocation
        assert main([*argv, "--ratio", "0.4", "--allocation", allocation, "--out", str(out)]) == 0, capsys.readouterr().err
        assert "pruned expert widths are multiples of 128" in capsys.readouterr().out
        widths = {t.shape[0] for k, t in _state(out).items() if k.endswith("up_proj.weight")}
        assert widths and all(w % BLOCK == 0 for w in widths) and widths != {384}, (allocation, widths)
        x = torch.randint(3, 100, (1, 8))
        with torch.no_grad():  # per-layer and padded widths load through the checkpoint's own code
            torch.testing.assert_close(moe_fx.load(out)(x).logits, AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)(x).logits)
    counts = json.dumps({f"model.layers.{i}.mlp": 8 for i in range(2)})  # per-layer widths in transformers' FP8 path too
    done = subprocess.run([sys.executable, "-c", FP8_PATH, str(tmp_path / "layer"), counts], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
    assert main(["quantize", str(micro_path), "--out", str(tmp_path / "micro-fp8"), "--quiet"]) == 0
    assert "transformers' GPU FP8 kernels refuse partial blocks" in capsys.readouterr().out
    assert "partial_blocks" not in json.loads((tmp_path / "uniform" / "moe_fx.json").read_text())["quantization"]
