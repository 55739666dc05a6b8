"""Per-layer expert counts: global allocation, the loadable per-layer format, and re-pruning it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_qwen3
from test_families import kept_ids, logits, realigned, tiny_model
from tiny_models import TINY_FAMILIES
from transformers import AutoModelForCausalLM

from moe_fx import PrunePlan, load, state_of
from moe_fx.errors import BadOptionError
from moe_fx.formats import save_checkpoint
from moe_fx.model.per_layer import LAYOUT_KEY
from moe_fx.model.trace import trace
from moe_fx.passes import DropExperts
from moe_fx.plan.allocate import global_plan, uniform_plan
from moe_fx.rewrite.drop_experts import drop_experts

X = torch.randint(2, 128, (2, 16), generator=torch.Generator().manual_seed(3))


def _uneven(model) -> PrunePlan:
    spec = state_of(model).spec
    return PrunePlan({spec.blocks[0].path: [0, 2, 3, 5, 6], spec.blocks[1].path: [1, 4, 7]})


def test_per_layer_checkpoint_loads_three_ways(tmp_path) -> None:
    model = tiny_qwen3()
    DropExperts(plan=_uneven(model))(model)
    ref = model(input_ids=X).logits
    out = save_checkpoint(model, tmp_path / "pl")
    config = json.loads((out / "config.json").read_text())
    assert [b["shapes"][b_path + ".gate.weight"][0] for b_path, b in config[LAYOUT_KEY]["blocks"].items()] == [5, 3]
    assert config["num_experts"] == 5 and (out / "modeling_moe_fx.py").is_file()
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_moe_fx.MoeFxQwen3MoeForCausalLM"}
    ours = load(out)  # no remote code: moe-fx builds the same class
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    for m in (ours, remote):
        assert [b.num_experts for b in trace(m).blocks] == [5, 3]
        assert torch.equal(realigned(m)(input_ids=X).logits, ref)
        # each experts module's config reports its own count (what transformers' FP8 loader sizes FP8Experts from),
        # every other attribute, and any change to it, are the model config's
        experts = [m.get_submodule(b.experts.path) for b in trace(m).blocks]
        assert [e.config.num_experts for e in experts] == [5, 3] and m.config.num_experts == 5
        assert all(e.config.hidden_size == m.config.hidden_size for e in experts)
        m.set_experts_implementation("batched_mm")
        assert all(e.config._experts_implementation == "batched_mm" for e in experts)
    # stock loading without the remote class must fail loudly, never load mismatched experts silently
    with pytest.raises(RuntimeError, match="mismatch"):
        AutoModelForCausalLM.from_pretrained(out)


def test_repruning_a_per_layer_model(tmp_path) -> None:
    model = tiny_qwen3()
    DropExperts(plan=_uneven(model))(model)
    first = load(save_checkpoint(model, tmp_path / "a"))
    spec = state_of(first).spec
    DropExperts(plan=PrunePlan({spec.blocks[0].path: [0, 1, 4], spec.blocks[1].path: [0, 1]}))(first)
    ref = first(input_ids=X).logits
    second = load(save_checkpoint(first, tmp_path / "b"))
    assert [b.num_experts for b in trace(second).blocks] == [3, 2]
    assert torch.equal(realigned(second)(input_ids=X).logits, ref)
    assert (tmp_path / "b" / "modeling_moe_fx.py").read_text().count("MoeFxMoeFx") == 0
    # back to one count everywhere: a stock checkpoint again, without our class or its auto_map
    spec = state_of(second).spec
    DropExperts(plan=PrunePlan({spec.blocks[0].path: [0, 2]}))(second)
    ref = second(input_ids=X).logits
    out = save_checkpoint(second, tmp_path / "c")
    config = json.loads((out / "config.json").read_text())
    assert LAYOUT_KEY not in config and "auto_map" not in config and not (out / "modeling_moe_fx.py").exists()
    stock = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(realigned(stock)(input_ids=X).logits, ref)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_per_layer_format_every_family(family: str, tmp_path) -> None:
    model = tiny_model(family)
    spec = trace(model)
    first = spec.blocks[0].layer_index
    pruned = [b for b in spec.blocks if b.layer_index == first]  # blocks of later layers keep every expert
    if len(pruned) == len(spec.blocks):
        pytest.skip("one MoE layer: nothing to vary")
    drop_experts(model, spec, PrunePlan({b.path: kept_ids(spec) for b in pruned}))
    ref = logits(model)
    reloaded = realigned(load(save_checkpoint(model, tmp_path / "pl"), experts_implementation=None))  # same kernels as `model`
    expected = [len(kept_ids(spec)) if b in pruned else b.num_experts for b in spec.blocks]
    assert [b.num_experts for b in trace(reloaded).blocks] == expected
    # the config holds the widest block's count, not the first block's: its keys are still found (inspect, re-pruning)
    assert trace(reloaded).config_count_keys == spec.config_count_keys
    assert torch.equal(logits(reloaded), ref)


def _scores(spec, per_block):
    return {b.path: torch.tensor(v, dtype=torch.float64) for b, v in zip(spec.blocks, per_block)}


def test_global_plan_moves_slots_to_flat_blocks() -> None:
    spec = state_of(tiny_qwen3()).spec
    flat = [1.0] * 8
    skewed = [10.0, 9.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    plan = global_plan(spec, _scores(spec, [flat, skewed]), ratio=0.5)
    counts = [len(plan.kept_experts[b.path]) for b in spec.blocks]
    assert sum(counts) == sum(len(v) for v in uniform_plan(spec, _scores(spec, [flat, skewed]), ratio=0.5).kept_experts.values())
    assert counts[0] > counts[1] >= spec.blocks[1].top_k
    assert plan.kept_experts[spec.blocks[1].path][:2] == [0, 1]
    assert global_plan(spec, _scores(spec, [flat, skewed]), ratio=0.5) == plan  # deterministic


def test_global_plan_keeps_top_k_everywhere() -> None:
    spec = state_of(tiny_qwen3()).spec
    plan = global_plan(spec, _scores(spec, [[1.0] * 8, [1e-6] * 8]), ratio=0.75)
    assert [len(plan.kept_experts[b.path]) for b in spec.blocks] == [2, 2]
    with pytest.raises(BadOptionError, match="min_keep"):
        global_plan(spec, _scores(spec, [[1.0] * 8, [1.0] * 8]), ratio=0.75, min_keep=3)
