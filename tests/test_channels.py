"""Channel pruning inside experts: the rewrite is exact, every format reloads, and the scores are what they claim."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_qwen3
from test_families import logits, realigned, tiny_model
from tiny_models import TINY_FAMILIES
from transformers import AutoModelForCausalLM

from moe_fx import compose, load, state_of
from moe_fx.errors import BadOptionError, MoeFxError, PassOrderError
from moe_fx.formats import save_checkpoint
from moe_fx.model.expert_weights import neuron_tensors
from moe_fx.model.per_layer import LAYOUT_KEY
from moe_fx.model.trace import trace
from moe_fx.passes import Calibrate, CompensateExperts, DropExperts, PruneChannels, Score
from moe_fx.plan.channel_allocate import (
    _best,
    bucket_channels,
    coverage_channels,
    expert_channels,
    layer_bucket_channels,
    layer_channels,
    uniform_channels,
)
from moe_fx.plan.plans import ChannelPlan

X = torch.randint(2, 128, (2, 16), generator=torch.Generator().manual_seed(3))


def _random_plan(spec, keep: float, seed: int = 0, vary: bool = False) -> ChannelPlan:
    """Each expert keeps a random subset of its channels (of varying sizes when ``vary``)."""
    g = torch.Generator().manual_seed(seed)
    kept = {}
    for b in spec.blocks:
        width = b.experts.intermediate_size
        sizes = [max(1, int(width * keep * (0.5 + torch.rand(1, generator=g).item()) if vary else width * keep)) for _ in range(b.num_experts)]
        kept[b.path] = [sorted(torch.randperm(width, generator=g)[: min(n, width)].tolist()) for n in sizes]
    return ChannelPlan(kept, multiple=8)


def channel_model(family: str):
    """The family's tiny model, the test skipped where its experts have no per-neuron tensors."""
    model = tiny_model(family)
    if not _supports_channels(model):
        pytest.skip("expert layout without per-neuron tensors")
    return model


def _supports_channels(model) -> bool:
    try:
        for b in trace(model).blocks:
            neuron_tensors(model, b.experts)
    except MoeFxError:
        return False
    return True


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_zeroing_equals_removing_and_reloads(family: str, tmp_path) -> None:
    """Removing channels computes what zeroing them computes; the smaller model saves and reloads exactly."""
    model = channel_model(family)
    spec = trace(model)
    plan = _random_plan(spec, 0.5)
    masked = tiny_model(family)
    PruneChannels(plan=plan, mask_only=True)(masked)
    PruneChannels(plan=plan)(model)
    assert [b.experts.intermediate_size for b in trace(model).blocks] == [len(plan.kept_channels[b.path][0]) for b in spec.blocks]
    ref = logits(model)
    torch.testing.assert_close(ref, logits(masked), rtol=1e-4, atol=1e-5)
    with pytest.raises(BadOptionError, match="mask_only"):
        save_checkpoint(masked, tmp_path / "masked")
    reloaded = realigned(load(save_checkpoint(model, tmp_path / "pruned"), experts_implementation=None))  # same kernels as `model`
    assert torch.equal(logits(reloaded), ref)


def test_keeping_every_channel_is_identical() -> None:
    model = tiny_qwen3()
    ref = model(input_ids=X).logits
    spec = trace(model)
    PruneChannels(plan=ChannelPlan({b.path: [list(range(b.experts.intermediate_size))] * b.num_experts for b in spec.blocks}))(model)
    assert torch.equal(model(input_ids=X).logits, ref)


def test_uniform_width_is_a_stock_checkpoint(tmp_path) -> None:
    model = tiny_qwen3()
    PruneChannels(plan=_random_plan(trace(model), 0.5))(model)
    ref = model(input_ids=X).logits
    out = save_checkpoint(model, tmp_path / "u")
    config = json.loads((out / "config.json").read_text())
    assert config["moe_intermediate_size"] == 8 and LAYOUT_KEY not in config and not (out / "modeling_moe_fx.py").exists()
    stock = realigned(AutoModelForCausalLM.from_pretrained(out))
    assert torch.equal(stock(input_ids=X).logits, ref)


def test_per_layer_and_per_expert_widths_reload(tmp_path) -> None:
    model = tiny_qwen3()
    spec = trace(model)
    per_layer = ChannelPlan({spec.blocks[0].path: [list(range(8))] * 8, spec.blocks[1].path: [list(range(16))] * 8})
    PruneChannels(plan=per_layer)(model)
    assert [b.experts.intermediate_size for b in trace(model).blocks] == [8, 16]
    varied = tiny_qwen3()
    plan = _random_plan(spec, 0.4, seed=2, vary=True)
    plan.kept_channels[spec.blocks[1].path][3] = []  # an expert left with no channel is dropped
    PruneChannels(plan=plan)(varied)
    assert [b.num_experts for b in trace(varied).blocks] == [8, 7]
    for m, name in ((model, "layer"), (varied, "expert")):
        ref = m(input_ids=X).logits
        out = save_checkpoint(m, tmp_path / name)
        assert LAYOUT_KEY in json.loads((out / "config.json").read_text())
        for reloaded in (load(out), AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)):
            assert torch.equal(realigned(reloaded)(input_ids=X).logits, ref)


def _manual_grads(model, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Brute force, independent of moe-fx's observers: replace every experts forward by an explicit
    per-(token, slot) computation whose intermediate activation ``a [T, k, I]`` is a graph leaf's product, run
    the summed next-token loss backward, and return per block ``(a, dL/da, top_k_index)``."""
    spec = trace(model)
    captured, originals = {}, {}
    for b in spec.blocks:
        experts = model.get_submodule(b.experts.path)
        originals[b.path] = experts.forward

        def forward(h, idx, w, experts=experts, path=b.path):
            gate, up = torch.einsum("th,tkih->tki", h, experts.gate_up_proj[idx]).chunk(2, dim=-1)
            a = F.silu(gate) * up
            a.retain_grad()
            captured[path] = (a, idx)
            y = torch.einsum("tki,tkhi->tkh", a, experts.down_proj[idx])
            return (y * w.unsqueeze(-1)).sum(1)

        experts.forward = forward
    out = model(input_ids=x).logits[:, :-1]
    F.cross_entropy(out.reshape(-1, out.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").backward()
    for b in spec.blocks:
        model.get_submodule(b.experts.path).forward = originals[b.path]
    return {p: (a.detach(), a.grad, idx) for p, (a, idx) in captured.items()}


def test_fisher_and_heapr_match_brute_force() -> None:
    model = tiny_qwen3()
    x = torch.randint(2, 128, (2, 24), generator=torch.Generator().manual_seed(5))
    compose(Calibrate(x, observers=("channels", "channel_grads"), batch_size=2, show_progress=False))(model)
    state = state_of(model)
    fisher = Score("fisher").run(model, state) and state.scores.per_block
    heapr = Score("heapr").run(model, state) and state.scores.per_block
    brute = _manual_grads(tiny_qwen3(), x)
    for b in state.spec.blocks:
        a, g, idx = brute[b.path]
        e_count, width = b.num_experts, b.experts.intermediate_size
        want_fisher, act_sq, grad_sq = (torch.zeros(e_count, width, dtype=torch.float64) for _ in range(3))
        count = torch.zeros(e_count, dtype=torch.float64)
        for e in range(e_count):
            t, s = (idx == e).nonzero(as_tuple=True)
            want_fisher[e] = ((a[t, s] * g[t, s]) ** 2).sum(0).double()
            act_sq[e], grad_sq[e], count[e] = (a[t, s] ** 2).sum(0).double(), (g[t, s] ** 2).sum(0).double(), len(t)
        c = count.clamp(min=1)[:, None]
        torch.testing.assert_close(fisher[b.path], want_fisher, rtol=1e-3, atol=1e-9)
        torch.testing.assert_close(heapr[b.path], act_sq / c * grad_sq / c, rtol=1e-3, atol=1e-9)


def test_allocations_meet_the_budget_and_prefer_high_scores() -> None:
    model = tiny_qwen3()
    spec = trace(model)
    g = torch.Generator().manual_seed(0)
    scores = {b.path: torch.rand(b.num_experts, b.experts.intermediate_size, generator=g, dtype=torch.float64) for b in spec.blocks}
    scores[spec.blocks[1].path] *= 10  # block 1 matters more: global rankings give it more channels
    total = sum(b.num_experts * b.experts.intermediate_size for b in spec.blocks)
    for allocate in (uniform_channels, layer_channels, expert_channels, coverage_channels):
        plan = allocate(spec, scores, 0.5, comparable=True)
        kept = sum(len(k) for b in spec.blocks for k in plan.kept_channels[b.path])
        assert abs(kept - total / 2) <= 8 * len(spec.blocks), allocate.__name__
        for b in spec.blocks:  # within an expert, the kept channels are its best
            for e, ids in enumerate(plan.kept_channels[b.path]):
                if ids:
                    dropped = sorted(set(range(b.experts.intermediate_size)) - set(ids))
                    assert not dropped or float(scores[b.path][e, ids].min()) >= float(scores[b.path][e, dropped].max())
    per_layer = layer_channels(spec, scores, 0.25, comparable=True)
    assert len(per_layer.kept_channels[spec.blocks[1].path][0]) > len(per_layer.kept_channels[spec.blocks[0].path][0])


def test_allocations_keep_whole_format_blocks() -> None:
    """``align`` (fp8-block's 128): every allocation stores the widths of an expert wider than a block in whole
    blocks, and keeps the usual step of 8 for an expert within one block; the plan's record keeps it."""
    spec = trace(tiny_qwen3())
    wide, narrow = spec.blocks[0].path, spec.blocks[1].path
    sized = lambda b, width: dataclasses.replace(b, experts=dataclasses.replace(b.experts, intermediate_size=width))
    spec = dataclasses.replace(spec, blocks=(sized(spec.blocks[0], 768), sized(spec.blocks[1], 96)))
    g = torch.Generator().manual_seed(0)
    scores = {b.path: torch.rand(b.num_experts, b.experts.intermediate_size, generator=g, dtype=torch.float64) for b in spec.blocks}
    for allocate in (uniform_channels, layer_channels, expert_channels, coverage_channels, bucket_channels, layer_bucket_channels):
        plan = allocate(spec, scores, 0.4, comparable=True, align=128)
        assert plan.width(spec.blocks[0]) % 128 == 0 and plan.width(spec.blocks[1]) % 8 == 0, allocate.__name__
        assert plan.width(spec.blocks[0]) < 768 or allocate in (expert_channels, coverage_channels), allocate.__name__
        if allocate in (uniform_channels, layer_channels):  # one width a block: the kept counts are the widths
            assert {len(k) for k in plan.kept_channels[wide]} == {plan.width(spec.blocks[0])}
            assert len(plan.kept_channels[narrow][0]) % 8 == 0
        assert ChannelPlan.from_dict(json.loads(json.dumps(plan.to_dict()))).align == 128
    assert uniform_channels(spec, scores, 0.4).width(spec.blocks[0]) == 464  # without a format block: steps of 8


def test_bad_channel_options_are_named() -> None:
    model = tiny_qwen3()
    with pytest.raises(PassOrderError, match="channel scores"):
        PruneChannels(ratio=0.5)(model)
    x = torch.randint(2, 128, (2, 16))
    compose(Calibrate(x, observers=("channels",), show_progress=False), Score("activation"))(model)
    with pytest.raises(BadOptionError, match="ratio must be in"):
        PruneChannels(ratio=1.5)(model)
    with pytest.raises(BadOptionError, match="unknown channel allocation"):
        PruneChannels(ratio=0.5, allocation="magic")(model)
    spec = trace(model)
    with pytest.raises(BadOptionError, match="in \\[0, 16\\)"):
        PruneChannels(plan=ChannelPlan({spec.blocks[0].path: [[99]] * 8}))(model)


def test_channel_plan_round_trips_and_reports_padding() -> None:
    model = tiny_qwen3()
    spec = trace(model)
    plan = _random_plan(spec, 0.4, seed=1, vary=True)
    assert ChannelPlan.from_dict(json.loads(json.dumps(plan.to_dict()))).kept_channels == plan.kept_channels
    model = PruneChannels(plan=plan)(model)
    report = state_of(model).history[-1].report
    assert report["routed_params_ideal"] < report["routed_params_after"] < report["routed_params_before"]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_batched_expert_math_matches_per_expert(family: str) -> None:
    """The observers' one-matmul path over all routes equals the per-expert math in every stored layout."""
    from moe_fx.model.expert_math import ExpertMath

    model = tiny_model(family)
    block = trace(model).blocks[0]
    try:
        math = ExpertMath(model, block.experts)
    except MoeFxError:
        pytest.skip("experts math not reproducible (custom activation)")
    g = torch.Generator().manual_seed(0)
    hidden = math.down(0, torch.zeros(1)).shape[1]  # the experts' own width (muse_spark's differs from the router's)
    x = torch.randn(40, hidden, generator=g)
    grad = torch.randn(40, hidden, generator=g)
    ids = torch.randint(0, block.num_experts, (40,), generator=g)
    pre, back = math.routed_pre_activations(x, ids), math.routed_down_input_grad(grad, ids)
    for e in ids.unique().tolist():
        rows = ids == e
        torch.testing.assert_close(pre[rows], math.pre_activations(e, x[rows]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(back[rows], grad[rows] @ math.down(e, grad).T, rtol=1e-4, atol=1e-5)


def _removal_cost(gram: torch.Tensor, gram_w: torch.Tensor, removed: list[int]) -> float:
    """Least-squares error ``min tr(Delta^T G Delta)`` over updates of the down rows that zero rows ``removed``, in
    closed form from ``G`` and ``D^T D`` (brute force over a removal set; OBS tracks it incrementally)."""
    if not removed:
        return 0.0
    inv = torch.linalg.inv(gram)[removed][:, removed]
    return float(torch.trace(torch.linalg.inv(inv) @ gram_w[removed][:, removed]))


@pytest.mark.parametrize("block", [1, 3, 64])
def test_obs_elimination_follows_the_brute_force_greedy(block: int) -> None:
    """Each step removes the channel whose removal, with the others' down rows re-solved, adds the least error;
    whether the updates are folded into the matrices after every removal, every third, or never (``block``)."""
    from moe_fx.score.obs import obs_elimination

    g = torch.Generator().manual_seed(0)
    n_exp, width, hidden, damp = 2, 7, 5, 0.01
    a = torch.randn(n_exp, 40, width, generator=g, dtype=torch.float64) * torch.rand(width, generator=g, dtype=torch.float64)
    dt = torch.randn(n_exp, width, hidden, generator=g, dtype=torch.float64)
    grams, gram_w = a.transpose(1, 2) @ a, dt @ dt.transpose(1, 2)
    scores = obs_elimination(grams, gram_w, damp, block=block)
    for e in range(n_exp):
        damped = grams[e] + damp * grams[e].diagonal().mean() * torch.eye(width, dtype=torch.float64)
        removed, running = [], 0.0
        for _ in range(width):
            base = _removal_cost(damped, gram_w[e], removed)
            costs = {j: _removal_cost(damped, gram_w[e], removed + [j]) - base for j in range(width) if j not in removed}
            j = min(costs, key=costs.get)
            running = max(running, costs[j])
            torch.testing.assert_close(float(scores[e, j]), running, rtol=1e-6, atol=1e-12)
            removed.append(j)
        assert torch.argsort(scores[e]).tolist() == removed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/test_gpu.sh)")
def test_obs_elimination_replayed_as_cuda_graph_is_identical() -> None:
    """``graphs=True``: blocks after the first replay one captured CUDA graph; the costs equal the eager steps' to the bit
    (a width that leaves a tail of steps after the last full block)."""
    from moe_fx.score.obs import obs_elimination

    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(5, 300, 200, generator=g, device="cuda", dtype=torch.float64)
    dt = torch.randn(5, 200, 48, generator=g, device="cuda", dtype=torch.float64)
    grams, gram_w = a.transpose(1, 2) @ a, dt @ dt.transpose(1, 2)
    assert torch.equal(obs_elimination(grams, gram_w, 0.01, block=32, graphs=True), obs_elimination(grams, gram_w, 0.01, block=32))


def test_obs_elimination_benchmark_runs_on_cpu(tmp_path) -> None:
    """``benchmarks/obs_elimination.py`` end to end at tiny shapes (on a CPU both rows run the eager steps)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "obs.json"
    argv = ["obs_elimination.py", "--device", "cpu", "--experts", "2", "--width", "80", "--hidden", "16", "--tokens", "64",
            "--repeats", "1", "--out", str(out)]
    proc = subprocess.run([sys.executable, *argv], cwd=Path(__file__).resolve().parents[1] / "benchmarks", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["costs_identical"] and [r["graphs"] for r in result["rows"]] == [False, True]
    assert all(r["seconds"] > 0 for r in result["rows"])


def test_obs_scores_the_current_experts_after_a_drop() -> None:
    """Statistics recorded before a drop: obs re-routes the sample among the kept experts and scores them alone."""
    model = tiny_qwen3()
    x = torch.randint(2, 128, (4, 24), generator=torch.Generator().manual_seed(5))
    compose(Calibrate(x, observers=("routing", "reap", "inputs"), batch_size=2, show_progress=False), Score("reap"), DropExperts(ratio=0.25),
            Score("obs"))(model)
    state = state_of(model)
    for b in state.spec.blocks:
        s = state.scores.per_block[b.path]
        assert s.shape == (b.num_experts, b.experts.intermediate_size) and torch.isfinite(s).all() and (s >= 0).all()
        assert all(len(set(row.tolist())) == len(row) for row in s if row.max() > 0)  # a strict order within each routed expert


def test_obs_then_compensation_reconstructs_better_than_activation(micro_path) -> None:
    """What obs ranks by is the error compensation leaves: on the trained micro model, pruning half the channels by obs
    leaves less block reconstruction error after CompensateExperts than pruning by activation magnitude."""
    from moe_fx.formats.loading import load_model

    x = torch.randint(3, 8000, (8, 64), generator=torch.Generator().manual_seed(0))
    errors = {}
    for method in ("activation", "obs"):
        model = load_model(micro_path, dtype="float32")
        compose(Calibrate(x, observers=("inputs", "channels"), batch_size=4, show_progress=False), Score(method), PruneChannels(ratio=0.5),
                CompensateExperts())(model)
        errors[method] = state_of(model).report_of("compensate_experts")["mean_error_after"]
    assert errors["obs"] < 0.9 * errors["activation"], errors


def test_obs_refuses_prescaled_experts_and_bad_damping() -> None:
    from moe_fx.errors import UnsupportedFamilyError
    from moe_fx.score import get_scorer

    with pytest.raises(BadOptionError, match="damp"):
        get_scorer("obs", damp=0.0)
    llama4 = tiny_model("llama4")
    with pytest.raises(UnsupportedFamilyError, match="Llama 4"):
        get_scorer("obs").check(trace(llama4))


def test_best_channels_rank_ties_to_the_lower_id():
    """Each expert's best channels, from one stable sort of the block's scores: the ids a scalar-by-scalar Python
    ranking (score descending, then id) keeps, with ties, signed zeros and per-expert counts of their own."""
    scores = torch.randn(6, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scores[:, ::5] = 0.25
    scores[2, :8], scores[2, 8:16] = 0.0, -0.0
    counts = [1, 7, 12, 20, 39, 40]
    reference = [sorted(sorted(range(40), key=lambda j, e=e: (-float(scores[e, j]), j))[:n]) for e, n in enumerate(counts)]
    assert _best(scores, counts) == reference
    assert _best(scores.float(), counts) == reference
