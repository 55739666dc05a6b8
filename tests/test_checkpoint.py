import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_fx import PrunePlan, state_of
from moe_fx.errors import OutputPathError
from moe_fx.formats import save_checkpoint
from moe_fx.passes import DropExperts


def _prune_half(model):
    spec = state_of(model).spec
    DropExperts(plan=PrunePlan({b.path: [1, 3, 4, 6] for b in spec.blocks}))(model)
    return model


def test_saved_pruned_model_reloads_with_same_logits(tiny_model, tokens, tmp_path):
    m = _prune_half(tiny_model)
    with torch.no_grad():
        ref = m(input_ids=tokens).logits
    out = save_checkpoint(m, tmp_path / "pruned")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_experts"] == 4 and cfg["num_local_experts"] == 4  # every alias, for transformers 4.57 too
    record = json.loads((out / "moe_fx.json").read_text())
    assert record["plan"]["kept_experts"]["model.layers.0.mlp"] == [1, 3, 4, 6]
    assert record["experts_after"]["model.layers.1.mlp"] == 4 and "transformers" in record["versions"]
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 4
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=tokens).logits, ref)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_refuses_existing_output_and_source_overlap(tiny_model, tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputPathError, match="already exists"):
        save_checkpoint(tiny_model, tmp_path / "exists")
    with pytest.raises(OutputPathError, match="overlaps the source"):
        save_checkpoint(tiny_model, tmp_path / "src", source=tmp_path / "src")
    save_checkpoint(tiny_model, tmp_path / "exists", overwrite=True)
    assert (tmp_path / "exists" / "config.json").is_file()


def test_failure_leaves_no_partial_output(tiny_model, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(tiny_model), "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tiny_model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_plan_records_original_ids_after_two_drops(tiny_model, tokens):
    spec = state_of(tiny_model).spec
    DropExperts(plan=PrunePlan({b.path: [1, 2, 4, 5, 6, 7] for b in spec.blocks}))(tiny_model)
    DropExperts(plan=PrunePlan({b.path: [0, 2, 3, 5] for b in state_of(tiny_model).spec.blocks}))(tiny_model)
    assert state_of(tiny_model).plan.kept_experts["model.layers.0.mlp"] == [1, 4, 5, 7]
    from conftest import tiny_qwen3

    direct = tiny_qwen3()
    DropExperts(plan=PrunePlan({b.path: [1, 4, 5, 7] for b in spec.blocks}))(direct)
    with torch.no_grad():
        assert torch.equal(direct(input_ids=tokens).logits, tiny_model(input_ids=tokens).logits)


def test_plan_round_trips_through_the_record(tiny_model, tmp_path):
    _prune_half(tiny_model)
    out = save_checkpoint(tiny_model, tmp_path / "p")
    plan = PrunePlan.from_dict(json.loads((out / "moe_fx.json").read_text())["plan"])
    assert plan.kept_experts == state_of(tiny_model).plan.kept_experts
