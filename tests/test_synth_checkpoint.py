"""benchmarks/synth_checkpoint.py writes checkpoints in the hub's layout, which moe-fx loads, routes through,
prunes in memory and streamed alike; a GPT-OSS source's MXFP4 experts stay MXFP4 in the pruned checkpoint."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import ASSETS, REPO
from safetensors import safe_open

import moe_fx
from moe_fx.formats import mxfp4
from moe_fx.formats.loading import load_tokenizer
from moe_fx.passes import Calibrate, DropExperts, Score
from moe_fx.run.streaming import stream_prune

sys.path.insert(0, str(REPO / "benchmarks"))
from synth_checkpoint import PRESETS, write_checkpoint

PROBE = torch.randint(3, 8000, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("synth")
    return {p: root / p for p in PRESETS if write_checkpoint(p, root / p, layers=3, tiny=True, tokenizer=ASSETS / "qwen3moe-micro", quiet=True)}


def _keys(path) -> dict[str, tuple]:
    """Name -> (shape, dtype) of every tensor of a checkpoint (sharded with an index, or one file)."""
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else None
    out = {}
    for file in set(index["weight_map"].values()) if index else ["model.safetensors"]:
        with safe_open(path / file, "pt") as f:
            out.update({k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()})
    assert index is None or set(out) == set(index["weight_map"])
    return out


def test_hub_layout(synthesized):
    qwen = _keys(synthesized["qwen3-30b-a3b"])
    assert qwen["model.layers.0.mlp.experts.15.gate_proj.weight"] == ((32, 64), "BF16")  # one tensor per expert
    assert qwen["model.layers.2.mlp.gate.weight"] == ((16, 64), "BF16")
    ds = _keys(synthesized["deepseek-v2-lite"])
    assert "model.layers.0.mlp.gate_proj.weight" in ds and not any(k.startswith("model.layers.0.mlp.experts") for k in ds)  # dense first layer
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in ds and "model.layers.1.mlp.shared_experts.up_proj.weight" in ds
    assert "model.layers.1.self_attn.kv_a_proj_with_mqa.weight" in ds  # MLA
    oss = _keys(synthesized["gpt-oss-20b"])
    assert oss["model.layers.0.mlp.experts.gate_up_proj_blocks"] == ((8, 128, 2, 16), "U8")
    assert oss["model.layers.0.mlp.experts.down_proj_scales"] == ((8, 64, 2), "U8")
    assert mxfp4.is_mxfp4(json.loads((synthesized["gpt-oss-20b"] / "config.json").read_text()))
    llama4 = _keys(synthesized["llama4-scout"])
    assert llama4["model.layers.0.feed_forward.experts.gate_up_proj"] == ((8, 64, 128), "BF16")  # fused, [E, H, 2I]
    assert llama4["model.layers.2.feed_forward.router.weight"] == ((8, 64), "BF16")


def test_seeded_and_independent_of_sharding(tmp_path):
    a = write_checkpoint("qwen3-30b-a3b", tmp_path / "a", layers=2, tiny=True, tokenizer=ASSETS / "qwen3moe-micro", quiet=True)
    b = write_checkpoint("qwen3-30b-a3b", tmp_path / "b", layers=2, tiny=True, tokenizer=ASSETS / "qwen3moe-micro", quiet=True, shard_gb=0.0005)
    assert a["shards"] == 1 and b["shards"] > 2
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    files = {p: json.loads((tmp_path / p / "model.safetensors.index.json").read_text())["weight_map"][name] for p in "ab"}
    tensors = [safe_open(tmp_path / p / files[p], "pt").get_tensor(name) for p in "ab"]
    assert torch.equal(*tensors)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_loads_and_routes_like_a_trained_model(preset, synthesized):
    """Every expert is reachable and loads are uneven, but no expert takes most tokens (not degenerate)."""
    path = synthesized[preset]
    model = moe_fx.compose(Calibrate(ASSETS / "calib.jsonl.gz", tokenizer=load_tokenizer(path), max_tokens=4096, seq_len=128,
                                     show_progress=False))(moe_fx.load(path))
    state = moe_fx.state_of(model)
    for block in state.spec.blocks:
        count = state.stats.get(block.path, "count")
        share = count / count.sum()
        assert count.min() > 0 and count.max() >= 1.5 * count.min() and share.max() < 0.35, (block.path, share)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_streamed_prune_equals_in_memory_and_reloads(preset, synthesized, tmp_path):
    path = synthesized[preset]
    tokenizer = load_tokenizer(path)
    passes = lambda: [Calibrate(ASSETS / "calib.jsonl.gz", tokenizer=tokenizer, max_tokens=2048, seq_len=128, show_progress=False),
                      Score("reap"), DropExperts(ratio=0.5)]
    in_memory = moe_fx.compose(*passes())(moe_fx.load(path, dtype="float32"))
    from moe_fx.formats import save_checkpoint

    saved = save_checkpoint(in_memory, tmp_path / "memory", source=path)
    streamed = stream_prune(path, tmp_path / "stream", passes(), dtype="float32", show_progress=False).out
    assert moe_fx.state_of(in_memory).plan.kept_experts == json.loads((streamed / "moe_fx.json").read_text())["plan"]["kept_experts"]
    with torch.no_grad():
        expected = in_memory(PROBE).logits
        for out in (saved, streamed):
            torch.testing.assert_close(moe_fx.load(out, dtype="float32")(PROBE).logits, expected, rtol=0, atol=1e-5)
    if preset == "gpt-oss-20b":  # MXFP4 in, MXFP4 out: the kept experts' codes, exactly (nothing was refit)
        for out in (saved, streamed):
            record = json.loads((out / "moe_fx.json").read_text())["expert_format"]
            assert record["format"] == "mxfp4" and record["max_relative_error"] == 0.0
            assert _keys(out)["model.layers.0.mlp.experts.gate_up_proj_blocks"] == ((4, 128, 2, 16), "U8")


def test_mxfp4_round_trip():
    """transformers' dequantization and ours agree; quantizing dequantized values gives them back exactly; other
    values are rounded to the nearest code (about 12% relative error on Gaussian weights)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (2, 8, 3, 16), generator=g, dtype=torch.int32).to(torch.uint8)
    scales = (120 + torch.randint(0, 4, (2, 8, 3), generator=g)).to(torch.uint8)
    w = mxfp4.dequantize(blocks, scales, torch.float32)
    assert torch.equal(w, convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    assert torch.equal(mxfp4.dequantize(*mxfp4.quantize(w), torch.float32), w)
    assert 0.05 < mxfp4.quantization_error(torch.randn(2, 64, 8, generator=g)) < 0.2
