"""MergeExperts: aligned, frequency-weighted folding of dropped experts into kept ones, then dropping them.

Functionally equal experts (one a neuron-permuted copy of the other) must merge exactly, in every expert
layout (gate/up concatenated or interleaved, transposed, non-gated, biases): the merged model then equals
the model that just drops the copy. The permuted copies are built here, independently of the module.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import tiny_qwen3
from tiny_models import TINY_FAMILIES, tiny_model
from torch import nn

from moe_fx.calibrate.stats import CalibrationStats
from moe_fx.errors import MoeFxError, PassOrderError
from moe_fx.formats.checkpoint import save_checkpoint
from moe_fx.formats.loading import load_model
from moe_fx.model.expert_weights import neuron_features, neuron_tensors, permute_expert
from moe_fx.model.spec import MoEModelSpec
from moe_fx.model.tensors import get_tensor
from moe_fx.model.trace import trace
from moe_fx.passes import Calibrate, DropExperts, MergeExperts, Score
from moe_fx.pipeline import compose, state_of
from moe_fx.plan.plans import PrunePlan
from moe_fx.rewrite.merge_experts import align, ream_distance, ream_targets
from moe_fx.score import Scores

INPUT = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
COPIES = {1: 0, 5: 4}
"""copy -> source: experts 1 and 5 are permuted copies of 0 and 4 (same routing group under n_group=2)."""


@functools.cache
def _pristine(family: str) -> nn.Module:
    return tiny_model(family)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT, use_cache=False).logits


def plan_without(spec: MoEModelSpec, dropped) -> PrunePlan:
    return PrunePlan({b.path: [i for i in range(b.num_experts) if i not in dropped] for b in spec.blocks})


def _transposed(proj: torch.Tensor, down: torch.Tensor, parts: int) -> bool:
    """Whether expert slices are ``[in, out]``: ``[H, parts*I]`` + ``[I, H]`` rather than ``[parts*I, H]`` + ``[H, I]``."""
    return proj.shape[1] == parts * down.shape[0] and proj.shape[0] != parts * down.shape[1]


def _reorder(x: torch.Tensor, p: torch.Tensor, parts: int, concatenated: bool) -> torch.Tensor:
    """``x [parts*I, ...]`` with neuron ``j``'s entries (gate and up row, or bias) taken from neuron ``p[j]``."""
    inter = len(p)
    if parts == 1:
        return x[p]
    if concatenated:
        return torch.cat([x[:inter][p], x[inter:][p]])
    return x.reshape(inter, 2, *x.shape[1:])[p].reshape(x.shape)


@torch.no_grad()
def make_permuted_copy(model: nn.Module, spec: MoEModelSpec, src: int, dst: int, seed: int, copy_router: bool) -> None:
    """In every block, overwrite expert ``dst`` by expert ``src`` with its intermediate neurons permuted."""
    gen = torch.Generator().manual_seed(seed)
    for block in spec.blocks:
        e = block.experts
        parts = 2 if e.gate_up else 1
        proj, down = get_tensor(model, e.gate_up or e.up), get_tensor(model, e.down)
        t = _transposed(proj[src], down[src], parts)
        w = proj[src].T if t else proj[src]  # [parts*I, H]
        p = torch.randperm(w.shape[0] // parts, generator=gen)
        new = _reorder(w, p, parts, e.is_concatenated)
        proj[dst].copy_(new.T if t else new)
        down[dst].copy_(down[src][p] if t else down[src][:, p])
        for name in e.tensors:
            if name == f"{e.gate_up or e.up}_bias":
                get_tensor(model, name)[dst].copy_(_reorder(get_tensor(model, name)[src], p, parts, e.is_concatenated))
            elif name == f"{e.down}_bias":
                get_tensor(model, name)[dst].copy_(get_tensor(model, name)[src])
        if copy_router:
            get_tensor(model, block.router.weight)[dst].copy_(get_tensor(model, block.router.weight)[src])


def _experts_agree(model: nn.Module, spec: MoEModelSpec, a: int, b: int) -> None:
    """Experts ``a`` and ``b`` of the first block compute the same function (routed call style)."""
    e = spec.blocks[0].experts
    if e.call_style != "routed":
        return
    proj, down = get_tensor(model, e.gate_up or e.up)[a], get_tensor(model, e.down)[a]
    width = proj.shape[0] if _transposed(proj, down, 2 if e.gate_up else 1) else proj.shape[1]
    x = torch.randn(16, width, generator=torch.Generator().manual_seed(3))
    mod = model.get_submodule(e.path)
    ones = torch.ones(16, 1)
    with torch.no_grad():
        ya = mod(x, torch.full((16, 1), a), ones)
        yb = mod(x, torch.full((16, 1), b), ones)
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)


def counts_stats(spec: MoEModelSpec, counts: torch.Tensor) -> CalibrationStats:
    return CalibrationStats(per_block={b.path: {"count": counts.double().clone()} for b in spec.blocks})


def _assert_same_experts(merged: nn.Module, dropped: nn.Module, spec: MoEModelSpec) -> None:
    for block in spec.blocks:
        for name in block.per_expert_tensors:
            torch.testing.assert_close(get_tensor(merged, name), get_tensor(dropped, name), atol=1e-6, rtol=0, msg=name)


# 0/0 weights keep the target, 0 on the target or on the copy, and arbitrary counts
COUNTS = [[3, 1, 2, 2, 5, 1, 1, 1], [0, 4, 2, 2, 7, 0, 1, 1], [0, 0, 2, 2, 0, 0, 1, 1]]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_identical_experts_merge_exactly(family: str) -> None:
    base = copy.deepcopy(_pristine(family))
    spec = trace(base)
    for i, (dst, src) in enumerate(COPIES.items()):
        make_permuted_copy(base, spec, src, dst, seed=i, copy_router=True)
    _experts_agree(base, spec, 0, 1)
    plan = plan_without(spec, COPIES)
    dropped = DropExperts(plan=plan)(copy.deepcopy(base))
    expected = logits(dropped)
    for c, counts in enumerate(COUNTS):
        merged = copy.deepcopy(base)
        state_of(merged).stats = counts_stats(spec, torch.tensor(counts))
        merged = MergeExperts(plan=plan)(merged)
        report = state_of(merged).history[-1].report
        assert report["merged"] == len(COPIES) * len(spec.blocks)
        assert report["similarity"] == "router"
        assert all(t == COPIES for t in report["targets"].values()), report["targets"]
        if c == 0:
            assert report["mean_alignment"] > 1 - 1e-6
        assert all(b.num_experts == 6 for b in state_of(merged).spec.blocks)
        _assert_same_experts(merged, dropped, state_of(merged).spec)
        torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=0)


def test_identical_experts_merge_exactly_with_calibrated_outputs(tokens) -> None:
    """Targets picked by output similarity on sampled tokens (Calibrate's ``samples`` observer)."""
    base = tiny_qwen3()
    spec = trace(base)
    for i, (dst, src) in enumerate(COPIES.items()):
        make_permuted_copy(base, spec, src, dst, seed=i, copy_router=False)
    plan = plan_without(spec, COPIES)
    dropped = DropExperts(plan=plan)(copy.deepcopy(base))
    calibrate = Calibrate(data=tokens, observers=("routing", "samples"), samples_per_block=32, show_progress=False)
    merged = compose(calibrate, MergeExperts(plan=plan))(base)
    report = state_of(merged).history[-1].report
    assert report["similarity"] == "outputs"
    assert all(t == COPIES for t in report["targets"].values()), report["targets"]
    _assert_same_experts(merged, dropped, state_of(merged).spec)
    torch.testing.assert_close(logits(merged), logits(dropped), atol=1e-5, rtol=0)


@pytest.mark.parametrize("grouping", ["nearest", "ream"])
@torch.no_grad()
def test_weighted_average_of_aligned_weights(grouping: str) -> None:
    """Expert 1 = expert 0 plus noise, neurons permuted: merged 3:1 by routed-token counts (nearest) or by the
    scores (ream; its counts alone would weigh 1:5), the kept expert is the hand-made average of the aligned weights."""
    model = tiny_qwen3()
    spec = trace(model)
    gen = torch.Generator().manual_seed(5)
    expected = {}
    for block in spec.blocks:
        gu, down = get_tensor(model, block.experts.gate_up), get_tensor(model, block.experts.down)
        inter = block.experts.intermediate_size
        # expert 1 = expert 0 plus noise, neurons permuted: its aligned weights are the noisy ones
        noisy_gu = gu[0] + 0.1 * gu[0].std() * torch.randn(gu[0].shape, generator=gen)
        noisy_down = down[0] + 0.1 * down[0].std() * torch.randn(down[0].shape, generator=gen)
        p = torch.randperm(inter, generator=gen)
        gu[1] = torch.cat([noisy_gu[:inter][p], noisy_gu[inter:][p]])
        down[1] = noisy_down[:, p]
        get_tensor(model, block.router.weight)[1] = get_tensor(model, block.router.weight)[0]
        expected[block.path] = ((3 * gu[0] + 1 * noisy_gu) / 4, (3 * down[0] + 1 * noisy_down) / 4)
    state = state_of(model)
    if grouping == "nearest":
        state.stats = counts_stats(spec, torch.tensor([3, 1, 1, 1, 1, 1, 1, 1]))
    else:
        h = spec.blocks[0].experts.hidden_size
        sample = {"sample_expert_out": torch.randn(4, 8, h, generator=gen), "sample_logits": torch.randn(4, 8, generator=gen),
                  "sample_seen": torch.tensor(4), "sample_hidden": torch.randn(4, h, generator=gen)}
        state.stats = CalibrationStats(per_block={b.path: {"count": torch.tensor([1.0, 5, 1, 1, 1, 1, 1, 1]), **sample} for b in spec.blocks})
        state.scores = Scores("reap", per_block={b.path: torch.tensor([3.0, 1, 0, 0, 0, 0, 0, 0]) for b in spec.blocks})
    MergeExperts(plan=plan_without(spec, {1}), grouping=grouping, align="weights")(model)
    assert state.history[-1].report["targets"] == {b.path: {1: 0} for b in spec.blocks}
    for block in spec.blocks:
        gu_hand, down_hand = expected[block.path]
        torch.testing.assert_close(get_tensor(model, block.experts.gate_up)[0], gu_hand, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(get_tensor(model, block.experts.down)[0], down_hand, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "nemotron_h", "llama4"])
def test_permute_expert_keeps_the_function(family: str) -> None:
    model = copy.deepcopy(_pristine(family))
    spec = trace(model)
    before = logits(model)
    for block in spec.blocks:
        tensors, _ = neuron_tensors(model, block.experts)
        old = neuron_features(model, tensors, 0)
        perm = torch.randperm(old.shape[0], generator=torch.Generator().manual_seed(2))
        permute_expert(model, tensors, 0, perm)
        assert torch.equal(neuron_features(model, tensors, 0), old[perm])
        assert torch.equal(align(old, old[perm])[0], torch.argsort(perm))
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=0)


def test_group_limited_target_stays_in_group() -> None:
    model = copy.deepcopy(_pristine("deepseek_v3"))
    spec = trace(model)
    assert spec.blocks[0].router.n_group == 2
    with torch.no_grad():
        for block in spec.blocks:  # expert 5's router row is expert 0's, but 0 is in the other group
            get_tensor(model, block.router.weight)[5] = get_tensor(model, block.router.weight)[0]
    state_of(model).stats = counts_stats(spec, torch.ones(8))
    MergeExperts(plan=plan_without(spec, {1, 5}))(model)
    for targets in state_of(model).history[-1].report["targets"].values():
        assert targets[1] in (0, 2, 3) and targets[5] in (4, 6, 7)


def _size(path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def test_saved_merged_checkpoint_is_smaller_and_reloads(tmp_path, tokens) -> None:
    model = tiny_qwen3()
    original = save_checkpoint(model, tmp_path / "original")
    calibrate = Calibrate(data=tokens, show_progress=False)
    merged = compose(calibrate, Score("frequency"), MergeExperts(ratio=0.5))(model)
    assert state_of(merged).history[-1].report["merged"] == 4 * 2
    out = save_checkpoint(merged, tmp_path / "merged")
    assert _size(out) < _size(original)
    reloaded = load_model(out)
    with torch.no_grad():
        for p in reloaded.parameters():  # fresh allocation: safetensors' offsets change CPU matmul bits
            p.data = p.data.clone()
    assert [b.num_experts for b in trace(reloaded).blocks] == [4, 4]
    assert torch.equal(logits(reloaded), logits(merged))


def test_missing_calibration_names_calibrate() -> None:
    model = tiny_qwen3()
    plan = plan_without(trace(model), {1})
    with pytest.raises(PassOrderError, match=r"Calibrate"):
        MergeExperts(plan=plan)(model)
    state_of(model).stats = CalibrationStats(per_block={b.path: {"reap_sum": torch.ones(8)} for b in state_of(model).spec.blocks})
    with pytest.raises(MoeFxError, match=r"count.*Calibrate\(observers=\('routing'"):
        MergeExperts(plan=plan)(model)
    assert state_of(model).spec.blocks[0].num_experts == 8  # nothing was changed


# ---------------------------------------------------------------------------------------------------------
# REAM grouping (grouping="ream", --method ream)


def _block(grouped: bool = False):
    return trace(_pristine("deepseek_v3" if grouped else "qwen3_moe")).blocks[0]


def test_ream_groups_fill_the_most_salient_centroids_first() -> None:
    block = _block()
    kept = [0, 2, 4, 6, 7]
    score = torch.tensor([5.0, 0, 1, 0, 9, 0, 2, 3])  # centroid order: 4, 0, 7, 6, 2
    d = torch.full((8, 8), 0.9)
    d[4, 1], d[4, 3], d[4, 5] = 0.1, 0.2, 0.3  # 4 is nearest to all three dropped experts
    d[0, 5] = 0.05  # ... but 5 is nearer still to 0, which comes second
    assert ream_targets(block, kept, score, d, group_size=3) == {1: 4, 3: 4, 5: 0}
    assert ream_targets(block, kept, score, d, group_size=4) == {1: 4, 3: 4, 5: 4}
    assert ream_targets(block, kept, score, d, group_size=2) == {1: 4, 5: 0, 3: 7}  # 7 takes its nearest free one


def test_ream_groups_stay_in_routing_group() -> None:
    block = _block(grouped=True)
    assert block.router.n_group == 2
    d = torch.rand(8, 8, generator=torch.Generator().manual_seed(0))
    d[0, 5] = d[0, 6] = -1.0  # nearest, but in the other group
    targets = ream_targets(block, [0, 2, 4, 7], torch.tensor([9.0, 0, 1, 0, 1, 0, 0, 1]), d, group_size=8)
    assert targets[1] == 0 and targets[3] == 0 and targets[5] in (4, 7) and targets[6] in (4, 7)


def test_ream_distance_matches_its_definition() -> None:
    """Against a direct per-pair computation: gated mean outputs' cosine and router-logit columns' distance."""
    state = state_of(copy.deepcopy(_pristine("qwen3_moe")))
    block = state.spec.blocks[0]
    gen = torch.Generator().manual_seed(1)
    n, e, h = 20, block.num_experts, 6
    out, logit = torch.randn(n, e, h, generator=gen), torch.randn(n, e, generator=gen)
    out[:, 3], logit[:, 3] = out[:, 2], logit[:, 2]  # expert 3 behaves as 2: distance 0
    state.stats = CalibrationStats(per_block={block.path: {"sample_expert_out": out, "sample_logits": logit, "sample_seen": torch.tensor(n)}})
    dist = ream_distance(state, block)
    p = torch.softmax(logit.double(), -1)
    mean = [(p[:, i, None] * out[:, i].double()).mean(0) for i in range(e)]
    col = [logit[:, i].double() / logit[:, i].double().norm() for i in range(e)]
    raw = torch.tensor([[float((col[i] - col[j]).norm()) for j in range(e)] for i in range(e)], dtype=torch.float64)
    for i in range(e):
        for j in range(e):
            s_out = (float(torch.nn.functional.cosine_similarity(mean[i], mean[j], dim=0)) + 1) / 2
            s_gate = 1 - float(raw[i, j] / raw.max())
            assert abs(float(dist[i, j]) - (1 - (s_out + s_gate) / 2)) < 1e-9
    assert abs(float(dist[2, 3])) < 1e-12


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_ream_identical_experts_merge_exactly(family: str, tokens) -> None:
    """Copies grouped with their source by REAM's distance, aligned on activations, averaged by score: the
    average of equal functions is the function, so the merge equals dropping the copies."""
    base = copy.deepcopy(_pristine(family))
    spec = trace(base)
    for i, (dst, src) in enumerate(COPIES.items()):
        make_permuted_copy(base, spec, src, dst, seed=i, copy_router=True)
    plan = plan_without(spec, COPIES)
    expected = logits(DropExperts(plan=plan)(copy.deepcopy(base)))
    model = compose(Calibrate(data=tokens, observers=("routing", "samples"), samples_per_block=32, show_progress=False))(base)
    score = torch.tensor([9.0, 1, 2, 3, 8, 1, 4, 5])  # the sources are the most salient centroids
    state_of(model).scores = Scores("reap", per_block={b.path: score.clone() for b in spec.blocks})
    merged = MergeExperts(plan=plan, grouping="ream")(model)
    report = state_of(merged).history[-1].report
    assert (report["grouping"], report["weighting"], report["align"]) == ("ream", "score", "activations")
    assert all(t == COPIES for t in report["targets"].values()), report["targets"]
    assert report["mean_alignment"] > 1 - 1e-6
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=0)


def test_ream_needs_samples_and_valid_options(tokens) -> None:
    model = tiny_qwen3()
    plan = plan_without(trace(model), {1})
    model = compose(Calibrate(data=tokens, show_progress=False), Score("reap"))(model)
    with pytest.raises(PassOrderError, match=r"sample_expert_out.*'samples'"):
        MergeExperts(plan=plan, grouping="ream")(copy.deepcopy(model))
    for bad in ({"grouping": "kmeans"}, {"weighting": "norm"}, {"align": "router"}, {"group_size": 1, "grouping": "ream"}):
        with pytest.raises(MoeFxError, match=next(iter(bad))):
            MergeExperts(plan=plan, **bad)(copy.deepcopy(model))


def test_ream_block_no_token_reached_is_dropped(tokens) -> None:
    """A block calibration never reached (Ernie-4.5-VL's vision experts under text): no sample, zero scores, so
    REAM groups by router rows and averages nothing in: the block equals plain dropping."""
    base = tiny_qwen3()
    spec = trace(base)
    plan = plan_without(spec, {1, 5})
    model = compose(Calibrate(data=tokens, observers=("routing", "reap", "samples"), samples_per_block=16, show_progress=False),
                    Score("reap"))(copy.deepcopy(base))
    state = state_of(model)
    unseen = spec.blocks[0].path
    state.stats.per_block[unseen]["sample_seen"].zero_()
    state.scores.per_block[unseen].zero_()
    merged = MergeExperts(plan=plan, grouping="ream")(model)
    report = state_of(merged).history[-1].report
    assert report["similarity"] == "ream+router" and report["align"] == "activations+weights"  # the unreached block: weights
    dropped = DropExperts(plan=plan)(copy.deepcopy(base))
    for name in state_of(merged).spec.blocks[0].per_expert_tensors:
        assert torch.equal(get_tensor(merged, name), get_tensor(dropped, name)), name
