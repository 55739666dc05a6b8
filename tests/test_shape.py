"""SHAPE (Shapley expert pruning): per-token coalition routing, the Monte Carlo estimate against exact Shapley
values, seeding, and the scorer end to end."""

import dataclasses
import itertools
import math

import pytest
import torch
from conftest import tiny_qwen3

from moe_fx import compose, state_of
from moe_fx.calibrate.stats import CalibrationStats
from moe_fx.errors import UnsupportedFamilyError
from moe_fx.model.routing import combine, route, route_within
from moe_fx.passes import Calibrate, Score
from moe_fx.score import get_scorer
from moe_fx.score.shape import candidate_sets, shapley_samples

E, K, H, T = 5, 2, 6, 6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The toy tensors are tiny: intra-op threads only add synchronisation (milliseconds per op on a busy host)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def block():
    return state_of(tiny_qwen3(num_experts=E, top_k=K)).spec.blocks[0]


def toy_stats(block, seed=0, t=T):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, E, generator=gen) * 1.5
    logits[:, 0] = -30.0  # expert 0 is never among any token's top-4 candidates
    out = torch.randn(t, E, H, generator=gen)
    idx, w = route(block.router, logits, None)
    acc = {
        "sample_logits": logits, "sample_expert_out": out, "sample_selection_bias": torch.zeros(E),
        "sample_topk_index": idx, "sample_topk_weight": w, "sample_seen": torch.tensor(t),
    }
    return CalibrationStats(per_block={block.path: acc})


def coalition_value(router, logits, out, allowed, y_full):
    y = combine(out, *route_within(router, logits, None, allowed))
    return -((y.double() - y_full.double()) ** 2).sum(-1)


def exact_shapley(block, stats, candidates):
    """Shapley values by enumerating every subset of each token's candidate set, ``[T, E]``."""
    acc = stats.per_block[block.path]
    logits, out = acc["sample_logits"], acc["sample_expert_out"]
    t = logits.shape[0]
    cand = torch.topk(torch.softmax(logits, -1), candidates, dim=-1).indices
    y_full = combine(out, *route(block.router, logits, None))
    value = {}
    for r in range(candidates + 1):
        for subset in itertools.combinations(range(candidates), r):
            allowed = torch.zeros(t, E, dtype=torch.bool)
            for p in subset:
                allowed[torch.arange(t), cand[:, p]] = True
            value[subset] = coalition_value(block.router, logits, out, allowed, y_full)
    phi = torch.zeros(t, E, dtype=torch.float64)
    n = candidates
    for p in range(n):
        others = [q for q in range(n) if q != p]
        for r in range(n):
            for s in itertools.combinations(others, r):
                w = math.factorial(r) * math.factorial(n - r - 1) / math.factorial(n)
                phi[torch.arange(t), cand[:, p]] += w * (value[tuple(sorted(s + (p,)))] - value[s])
    return phi, value[tuple(range(n))] - value[()]


def test_monte_carlo_matches_exact_shapley(block):
    stats = toy_stats(block)
    phi_exact, grand = exact_shapley(block, stats, 4)
    # efficiency: per token the exact values sum to v(C_t) - v(empty)
    assert torch.allclose(phi_exact.sum(-1), grand, rtol=1e-9, atol=1e-9)
    exact = phi_exact.mean(0)
    errors, stderr = {8: [], 1500: []}, {}
    for m, seeds in ((8, range(5)), (1500, [3])):
        for seed in seeds:
            scorer = get_scorer("shape", seed=seed, permutations=m, candidates=4)
            est = scorer.score_block(stats, block)
            se = stderr[m] = scorer.stderr[block.path]
            errors[m].append(float((est - exact).abs().max()))
            assert ((est - exact).abs() <= 5 * se + 1e-9).all(), (m, est, exact, se)
            assert est[0] == 0 and se[0] == 0  # never a candidate
    # more permutations: a smaller error and a standard error shrinking like 1/sqrt(M)
    assert errors[1500][0] < sum(errors[8]) / len(errors[8]) / 4
    assert errors[1500][0] < 0.05 * float(exact.abs().max())
    assert (stderr[1500][1:] < stderr[8][1:] / 8).all()


def test_per_token_efficiency_holds_for_every_sample(block):
    acc = toy_stats(block, seed=1).per_block[block.path]
    logits, out = acc["sample_logits"], acc["sample_expert_out"]
    cand = candidate_sets(block.router, logits, None, 4)
    phi, _ = shapley_samples(block.router, logits, out, None, cand, 3, torch.Generator().manual_seed(0))
    y_full = combine(out, *route(block.router, logits, None))
    allowed = torch.zeros(T, E, dtype=torch.bool).scatter_(1, cand, True)
    grand = coalition_value(block.router, logits, out, allowed, y_full) + (y_full.double() ** 2).sum(-1)
    assert torch.allclose(phi.sum(-1), grand, rtol=1e-9, atol=1e-9)


def test_scores_are_seeded(block):
    stats = toy_stats(block, seed=2)
    a = get_scorer("shape", seed=1, permutations=16, candidates=4)
    b = get_scorer("shape", seed=1, permutations=16, candidates=4)
    c = get_scorer("shape", seed=2, permutations=16, candidates=4)
    sa, sb, sc = (s.score_block(stats, block) for s in (a, b, c))
    assert torch.equal(sa, sb) and torch.equal(a.stderr[block.path], b.stderr[block.path])
    assert not torch.equal(sa, sc)
    tol = 5 * (a.stderr[block.path] ** 2 + c.stderr[block.path] ** 2).sqrt() + 1e-9
    assert ((sa - sc).abs() <= tol).all()


def test_routed_coalition_only(block):
    """k' = top_k: the players are the routed experts alone; unrouted experts score 0."""
    stats = toy_stats(block, seed=4)
    s = get_scorer("shape", permutations=4, candidates=K).score_block(stats, block)
    routed = stats.per_block[block.path]["sample_topk_index"].unique()
    assert (s[[e for e in range(E) if e not in routed.tolist()]] == 0).all()


@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid", "softmax_after_topk", "sigmoid_after_topk"])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_route_within_agrees_with_route(block, score_fn, norm, with_bias):
    router = dataclasses.replace(block.router, score_fn=score_fn, norm_topk_prob=norm, top_k=3, routed_scaling_factor=2.5)
    e, t = 8, 16
    gen = torch.Generator().manual_seed(hash((score_fn, norm, with_bias)) % 1000)
    logits = torch.randn(t, e, generator=gen) * 2
    bias = torch.randn(e, generator=gen) * (0.1 if score_fn in ("softmax", "sigmoid") else 1.0) if with_bias else None
    for size in (3, 5, 8):
        kept = torch.randperm(e, generator=gen)[:size].sort().values
        idx, w = route(router, logits, bias, kept)
        allowed = torch.zeros(t, e, dtype=torch.bool)
        allowed[:, kept] = True
        idx2, w2 = route_within(router, logits, bias, allowed)
        a, b = kept[idx].sort(-1), idx2.sort(-1)
        assert torch.equal(a.values, b.values)
        assert torch.allclose(w.gather(1, a.indices), w2.gather(1, b.indices), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid", "softmax_after_topk", "sigmoid_after_topk"])
def test_route_within_small_coalitions(block, score_fn):
    """|S| < k uses fewer experts (zero weight on the other picks), and the empty coalition gives no NaN."""
    router = dataclasses.replace(block.router, score_fn=score_fn, norm_topk_prob=True, top_k=3)
    logits = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    allowed = torch.zeros(3, 6, dtype=torch.bool)
    allowed[0, 4] = True
    allowed[1, [1, 5]] = True
    idx, w = route_within(router, logits, None, allowed)
    assert torch.isfinite(w).all()
    assert (w[~allowed.gather(1, idx)] == 0).all()
    assert (w > 0).sum(-1).tolist() == [1, 2, 0]
    assert torch.allclose(w[:2].sum(-1), torch.ones(2))


def test_group_limited_routing_is_refused(block):
    router = dataclasses.replace(block.router, n_group=2, topk_group=1)
    with pytest.raises(UnsupportedFamilyError, match="group-limited"):
        route_within(router, torch.zeros(2, E), None, torch.ones(2, E, dtype=torch.bool))


def test_refuses_routing_it_cannot_reproduce(block):
    stats = toy_stats(block)
    stats.per_block[block.path]["sample_logits"] = stats.per_block[block.path]["sample_logits"].flip(-1)
    with pytest.raises(UnsupportedFamilyError, match="reap"):
        get_scorer("shape").score_block(stats, block)


def test_end_to_end(tiny_model, tokens):
    m = compose(Calibrate(tokens, observers=("routing", "reap", "samples"), samples_per_block=64, show_progress=False), Score("shape"))(tiny_model)
    state = state_of(m)
    assert state.scores.method == "shape"
    for block in state.spec.blocks:
        s = state.scores.per_block[block.path]
        assert s.shape == (block.num_experts,) and torch.isfinite(s).all() and s.abs().sum() > 0
        logits = state.stats.get(block.path, "sample_logits")
        cand = candidate_sets(block.router, logits, None, 2 * block.top_k).unique().tolist()
        assert (s[[e for e in range(block.num_experts) if e not in cand]] == 0).all()
