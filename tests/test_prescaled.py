"""The routed forward of Llama 4's prescaled experts (moe_fx.kernels.prescaled): equal to transformers' dense
block, on the routed (token, slot) pairs only, installed by moe_fx.compile and removed again."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_model

import moe_fx
from moe_fx.kernels import prescaled
from moe_fx.passes import DropExperts, Score
from moe_fx.pipeline import compose, state_of

IDS = {n: torch.randint(3, 100, (2, n), generator=torch.Generator().manual_seed(n)) for n in (1, 3, 40)}


def _llama4() -> torch.nn.Module:
    return tiny_model("llama4").eval()


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("pruned", [False, True])
def test_routed_forward_equals_the_dense_block(pruned: bool, monkeypatch) -> None:
    model = _llama4()
    if pruned:  # fewer experts than the config's count: the view reads the live tensors
        model = compose(Score("random", seed=0), DropExperts(ratio=0.5))(model)
    spec = state_of(model).spec
    paths = [b.path for b in spec.blocks]
    expected = {n: _logits(model, ids) for n, ids in IDS.items()}
    rows = []
    forward = prescaled.moe_fx_experts_forward
    monkeypatch.setattr(prescaled, "moe_fx_experts_forward", lambda e, h, i, w: rows.append(h.shape[0]) or forward(e, h, i, w))
    assert prescaled.route_prescaled_blocks(model, paths) == len(spec.blocks)
    for n, ids in IDS.items():
        rows.clear()
        torch.testing.assert_close(_logits(model, ids), expected[n], atol=1e-5, rtol=1e-5)
        assert rows == [ids.numel() * spec.blocks[0].top_k] * len(spec.blocks)  # routed pairs only, not E x tokens
    prescaled.restore_prescaled_blocks(model, paths)
    assert all(torch.equal(_logits(model, ids), expected[n]) for n, ids in IDS.items())


def test_compile_routes_llama4_and_other_implementations_keep_the_dense_call() -> None:
    model = _llama4()
    spec = state_of(model).spec
    reference = _logits(copy.deepcopy(model), IDS[3])
    torch._dynamo.reset()
    compiled = moe_fx.compile(model, backend="eager")  # fullgraph: a graph break raises (Dynamo alone: no Inductor time)
    assert all("forward" in vars(model.get_submodule(b.path)) for b in spec.blocks)
    torch.testing.assert_close(_logits(compiled, IDS[3]), reference, atol=1e-5, rtol=1e-5)
    moe_fx.compile(model, experts_implementation="batched_mm")
    assert not any("forward" in vars(model.get_submodule(b.path)) for b in spec.blocks)
    torch._dynamo.reset()


def test_other_families_are_left_alone() -> None:
    model = tiny_model("qwen3_moe")
    moe_fx.compile(model, backend="eager")
    assert not any("forward" in vars(model.get_submodule(b.path)) for b in state_of(model).spec.blocks)


def test_a_block_of_another_shape_is_refused() -> None:
    model = _llama4()
    spec = state_of(model).spec
    del model.get_submodule(spec.blocks[0].path).shared_expert
    with pytest.raises(moe_fx.MoeFxError, match="Llama4TextMoe"):
        prescaled.route_prescaled_blocks(model, [spec.blocks[0].path])
