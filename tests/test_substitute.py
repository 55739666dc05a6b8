"""SubstituteExperts (MoNE): pruned experts become constants, the router stays whole.

The references here are built independently of the pass: the constant is checked against a per-expert least-squares
loop, and a substituted experts module against the *original* module called with the substituted pairs' weights
zeroed plus ``weight * constant`` added per pair.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from tiny_models import first_experts_call, tiny_model

import moe_fx
from moe_fx.errors import BadOptionError, PassOrderError, UnsupportedFamilyError
from moe_fx.formats.checkpoint import save_checkpoint
from moe_fx.formats.loading import load_model
from moe_fx.model.per_layer import NoviceExperts
from moe_fx.model.trace import trace
from moe_fx.passes import Calibrate, DropExperts, Score, SubstituteExperts
from moe_fx.pipeline import compose, state_of
from moe_fx.plan.plans import PrunePlan
from moe_fx.score.novice import novice_fit

FAMILIES = ("qwen3_moe", "mixtral", "deepseek_v3", "qwen2_moe", "gpt_oss")
"""Concatenated SwiGLU with and without shared experts / group-limited routing, and GPT-OSS (folded: biases)."""
TOKENS = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
PROBE = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


@functools.cache
def _calibrated(family: str):
    model = tiny_model(family).eval()
    return compose(Calibrate(data=TOKENS, observers=("routing", "inputs"), inputs_per_block=128, show_progress=False))(model)


def _fresh(family: str):
    """A copy of the calibrated model, with its own copy of the statistics (deepcopy copies the state too)."""
    return copy.deepcopy(_calibrated(family))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE, use_cache=False).logits


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_constant_is_the_weighted_least_squares_fit_and_error_its_residual(family):
    """Against the experts module run on each sampled token alone (weight 1): the constant minimises the weighted
    squared error by a least-squares solve, and the error is that fit's residual over the sampled tokens."""
    model = _calibrated(family)
    state = state_of(model)
    block = state.spec.blocks[0]
    acc = state.stats.per_block[block.path]
    n = min(int(acc["input_seen"]), len(acc["input_hidden"]))
    x, index, weight = acc["input_hidden"][:n], acc["input_topk_index"][:n], acc["input_topk_weight"][:n].double()
    constants, error = novice_fit(model, state.stats, block)
    experts = model.get_submodule(block.experts.path)
    checked = 0
    for e in range(block.num_experts):
        t, s = (index == e).nonzero(as_tuple=True)
        if len(t) < 2:
            continue
        with torch.no_grad():
            y = experts(x[t], torch.full((len(t), 1), e), torch.ones(len(t), 1)).double()
        w = weight[t, s][:, None]
        best = torch.linalg.lstsq(w, w * y).solution[0]
        torch.testing.assert_close(constants[e], best, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(error[e], ((w * (y - best)) ** 2).sum() / n, rtol=1e-3, atol=1e-7)
        checked += 1
    assert checked >= block.num_experts // 2


@pytest.mark.parametrize("family", FAMILIES)
def test_substituted_experts_add_the_constant_where_the_expert_ran(family):
    base = _calibrated(family)
    experts, (hidden, index, weight) = first_experts_call(base, PROBE)
    original = copy.deepcopy(experts)
    block = state_of(base).spec.blocks[0]
    constants, _ = novice_fit(base, state_of(base).stats, block)
    model = compose(Score("mone"), SubstituteExperts(ratio=0.5))(_fresh(family))
    state = state_of(model)
    dropped = state.history[-1].report["substituted_experts"][block.path]
    assert len(dropped) == block.num_experts // 2
    mask = torch.zeros(block.num_experts, dtype=torch.bool)
    mask[dropped] = True
    with torch.no_grad():
        expected = original(hidden, index, weight.masked_fill(mask[index], 0)) + (weight[..., None] * constants.float()[index]
                                                                                 * mask[index][..., None]).sum(1)
        got = model.get_submodule(block.experts.path)(hidden, index, weight)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    router = model.get_parameter(block.router.weight)
    assert router.shape[0] == block.num_experts  # the router still routes to every expert
    folded = family == "gpt_oss"
    assert isinstance(model.get_submodule(block.experts.path), NoviceExperts) != folded
    assert state.history[-1].report["folded_blocks" if folded else "novice_blocks"] == len(state.spec.blocks)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_saved_substitution_reloads_with_the_same_logits(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = compose(Score("mone"), SubstituteExperts(ratio=0.5))(_fresh(family))
    expected = _logits(model)
    save_checkpoint(model, tmp_path / "out")
    for reloaded in (moe_fx.load(tmp_path / "out"), AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)):
        torch.testing.assert_close(_logits(reloaded.eval()), expected, rtol=1e-5, atol=1e-5)
    if family == "qwen3_moe":  # the held experts and the constants are what is stored
        stored = moe_fx.load(tmp_path / "out").get_submodule(state_of(model).spec.blocks[0].experts.path)
        assert stored.gate_up_proj.shape[0] == 4 and stored.novices.shape[0] == 8 and int((stored.novice_slot < 0).sum()) == 4


def test_substituting_nothing_leaves_the_model_bit_identical():
    model = _fresh("qwen3_moe")
    before = _logits(model)
    spec = state_of(model).spec
    model = compose(Score("mone"), SubstituteExperts(keep=spec.blocks[0].num_experts))(model)
    assert not any(isinstance(m, NoviceExperts) for m in model.modules())
    assert torch.equal(_logits(model), before)


def test_refusals():
    model = compose(Score("mone"), SubstituteExperts(ratio=0.5))(_fresh("qwen3_moe"))
    with pytest.raises(PassOrderError, match="cannot run after substitute_experts"):
        compose(DropExperts(plan=PrunePlan({})))(model)
    with pytest.raises(UnsupportedFamilyError, match="substituted by constants"):
        trace(model)
    SubstituteExperts(ratio=0.5).check_layerwise()  # layer-local: it streams
    with pytest.raises(BadOptionError, match="streaming"):
        SubstituteExperts(ratio=0.5, allocation="global").check_layerwise()
    dropped = compose(Score("frequency"), DropExperts(ratio=0.25))(_fresh("qwen3_moe"))
    with pytest.raises(BadOptionError, match="substitute experts first"):
        compose(SubstituteExperts(ratio=0.25))(dropped)
    with pytest.raises(PassOrderError, match="inputs"):
        compose(Calibrate(data=TOKENS, show_progress=False), Score("reap"), SubstituteExperts(ratio=0.25))(tiny_model("qwen3_moe"))


def test_a_substituted_checkpoint_has_no_padded_form_and_inspect_describes_it(tmp_path, capsys):
    import json

    from moe_fx.cli import main

    model = compose(Score("mone"), SubstituteExperts(ratio=0.5))(_fresh("mixtral"))
    save_checkpoint(model, tmp_path / "out")
    with pytest.raises(UnsupportedFamilyError, match="substituted by constants"):
        load_model(tmp_path / "out", ragged=False)
    substituted = state_of(model).history[-1].report["substituted_experts"]
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "out"), "--json"]) == 0
    blocks = json.loads(capsys.readouterr().out)["substituted_blocks"]
    assert sum(b["substituted"] for b in blocks) == sum(len(v) for v in substituted.values()) > 0
    assert all(b["held experts"] + b["substituted"] == b["router experts"] == 8 for b in blocks)
    assert main(["inspect", str(tmp_path / "out")]) == 0
    assert "substituted by constants (MoNE) in" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "out"), "--verify"]) == 2
    assert "--verify checks a canonical spec" in capsys.readouterr().err


def test_refit_lowers_the_sampled_block_error_and_moves_the_constants():
    plain = compose(Score("mone"), SubstituteExperts(ratio=0.5))(_fresh("mixtral"))
    model = compose(Score("mone"), SubstituteExperts(ratio=0.5, refit=True))(_fresh("mixtral"))
    report = state_of(model).history[-1].report
    assert report["substituted_experts"] == state_of(plain).history[-1].report["substituted_experts"]  # the same choice
    for block in state_of(model).spec.blocks:
        fit = report["refit"][block.path]
        assert fit["error_after"] < fit["error_before"]
        held, refit = (m.get_submodule(block.experts.path) for m in (plain, model))
        assert not torch.allclose(held.novices, refit.novices) and torch.equal(held.novice_slot, refit.novice_slot)


def test_a_substituted_checkpoint_does_not_stream_into_another_prune(tmp_path):
    from moe_fx.run.streaming import stream_prune

    model = compose(Score("mone"), SubstituteExperts(ratio=0.5))(_fresh("qwen3_moe"))
    save_checkpoint(model, tmp_path / "out")
    with pytest.raises(UnsupportedFamilyError, match="substituted by constants"):
        stream_prune(tmp_path / "out", tmp_path / "again", [Score("frequency"), DropExperts(ratio=0.25)], show_progress=False)
    assert not (tmp_path / "again").exists()
