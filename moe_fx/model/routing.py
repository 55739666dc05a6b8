"""Routing from the spec: recompute top-k indices and weights from router logits, over any subset of experts.

Search methods (NAEE, SHAPE, merging) ask "what would this block compute if only these experts existed?".
Dropping experts slices router rows, so routing over a kept subset is the family's routing rule applied to
the kept columns of the logits. This module applies that rule as the spec describes it; the tests check it
against every family's real router on the full expert set.
"""

from __future__ import annotations

import torch

from moe_fx.errors import UnsupportedFamilyError
from moe_fx.model.spec import RouterSpec


def route(router: RouterSpec, logits: torch.Tensor, selection_bias: torch.Tensor | None, kept: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ``(index, weight)`` of shape ``[T, k]``; indices are positions in ``kept`` (or all experts).

    ``logits``: raw router logits ``[T, E]`` (router bias included); ``selection_bias``: ``[E]`` or None.
    """
    grouped = _grouped(router)
    if kept is not None:
        if grouped:
            _check_balanced(router, kept, logits.shape[1])
        logits = logits[:, kept]
        selection_bias = None if selection_bias is None else selection_bias.reshape(-1)[kept]
    logits = logits.float()
    bias = 0.0 if selection_bias is None else selection_bias.reshape(-1).float()
    k = router.top_k
    if router.score_fn in ("softmax", "sigmoid"):
        scores = torch.softmax(logits, dim=-1) if router.score_fn == "softmax" else torch.sigmoid(logits)
        choice = scores + bias
        idx = torch.topk(_within_best_groups(router, choice) if grouped else choice, k, dim=-1).indices
        weights = scores.gather(1, idx)
    else:
        top, idx = torch.topk(logits + bias, k, dim=-1)
        top = logits.gather(1, idx) if selection_bias is not None else top
        weights = torch.softmax(top, dim=-1) if router.score_fn == "softmax_after_topk" else torch.sigmoid(top)
    if router.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return idx, weights * router.routed_scaling_factor


def _grouped(router: RouterSpec) -> bool:
    """Whether ``router`` is group-limited; such routing is simulated for softmax and sigmoid scores only."""
    if not router.n_group or router.n_group <= 1:
        return False
    if router.score_fn not in ("softmax", "sigmoid") or router.group_score not in ("top2_sum", "max"):
        raise UnsupportedFamilyError(f"routing simulation of group-limited routing with {router.score_fn} scores is not implemented")
    return True


def check_group_simulation(router: RouterSpec) -> None:
    """Raise :class:`UnsupportedFamilyError` where :func:`route` cannot simulate ``router`` (checked up front)."""
    _grouped(router)


def check_subset_routing(router: RouterSpec) -> None:
    """Refuse routers whose routing over *any* subset of experts (:func:`route_within`, :func:`selection_scores`,
    NAEE's and SHAPE's coalitions) cannot be simulated: group-limited routers, where a subset with unequal counts
    per group has no pruned model to stand for."""
    if router.n_group and router.n_group > 1:
        raise UnsupportedFamilyError(
            f"{router.path}: group-limited routing (n_group={router.n_group}) is simulated only for the same number of "
            "kept experts per group, not over any subset of experts; use --method reap, frequency or eep"
        )


def _check_balanced(router: RouterSpec, kept: torch.Tensor, num_experts: int) -> None:
    """A group-limited block keeps the same number of experts in every group (:func:`~moe_fx.plan.PrunePlan.validate`),
    in order, so the kept experts form ``n_group`` groups of consecutive positions again."""
    size, groups = num_experts // router.n_group, router.n_group
    ids = torch.as_tensor(kept).reshape(-1)
    per = len(ids) // groups
    if len(ids) % groups or not bool((ids.sort().values // size == torch.arange(len(ids)) // per).all()):
        raise UnsupportedFamilyError(
            f"{router.path}: group-limited routing (n_group={groups}) over kept experts {ids.tolist()[:8]}... that are not "
            "the same number per group"
        )


def _within_best_groups(router: RouterSpec, choice: torch.Tensor) -> torch.Tensor:
    """``choice [T, E]`` with every expert outside each token's ``topk_group`` best groups set to a very low value:
    the group-limited step of the router (groups of ``E / n_group`` consecutive experts, scored by ``group_score``)."""
    t, e = choice.shape
    groups = router.n_group
    by_group = choice.view(t, groups, e // groups)
    if router.group_score == "max":
        group_scores = by_group.max(dim=-1).values
    else:
        group_scores = by_group.topk(min(2, e // groups), dim=-1).values.sum(dim=-1)
    best = torch.topk(group_scores, router.topk_group, dim=-1).indices
    allowed = torch.zeros(t, groups, dtype=torch.bool, device=choice.device).scatter_(1, best, True)
    return choice.masked_fill(~allowed.repeat_interleave(e // groups, dim=1), _MASKED)


def combine(expert_out: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Block output from all-expert outputs ``[T, E', H]`` and routing ``[T, k]``: ``sum_k w * y``."""
    picked = expert_out.gather(1, idx.unsqueeze(-1).expand(-1, -1, expert_out.shape[-1]))
    return (picked * weights.unsqueeze(-1).to(picked.dtype)).sum(dim=1)


def matches_recorded(
    router: RouterSpec, logits: torch.Tensor, selection_bias: torch.Tensor | None, index: torch.Tensor, weight: torch.Tensor,
    *, min_agreement: float = 0.95, tol: float = 0.02, scale_free: bool = True,
) -> bool:
    """Whether :func:`route` reproduces the routing the model really applied: the same experts for at least
    ``min_agreement`` of the tokens and the same relative weights on those, within ``tol``. This guard keeps
    search methods off routers whose rule the spec does not capture. The recorded logits are recomputed in
    float32 while a bf16 model rounds its own, which flips near-ties: 97% agreement in the first layer of
    qwen3moe-bench on the CPU (100% in float32). ``scale_free=False`` compares the weights themselves, within
    ``tol`` relative (scale and normalization included), not their ratios."""
    idx, w = route(router, logits, selection_bias)
    sim, real = idx.sort(-1), index.sort(-1)
    same = (sim.values == real.values).all(-1)
    if same.float().mean() < min_agreement:
        return False
    sim_w, real_w = w.gather(1, sim.indices)[same], weight.float().gather(1, real.indices)[same]
    if not scale_free:
        return bool(torch.allclose(sim_w, real_w, rtol=tol, atol=1e-6))
    norm = lambda x: x / x.sum(-1, keepdim=True).clamp(min=1e-20)
    return bool(torch.allclose(norm(sim_w), norm(real_w), atol=tol, rtol=0))


_MASKED = -1e9
"""Stand-in for -inf on experts outside a coalition: exp/sigmoid of it is exactly 0 in float32, and unlike
-inf it never makes NaN (a row with no allowed expert routes to zero-weight picks)."""


def selection_scores(router: RouterSpec, logits: torch.Tensor, selection_bias: torch.Tensor | None) -> torch.Tensor:
    """The ``[T, E]`` scores the router ranks experts by when all experts exist (top-k of these = the routed set)."""
    check_subset_routing(router)
    logits = logits.float()
    bias = 0.0 if selection_bias is None else selection_bias.reshape(-1).float()
    if router.score_fn == "softmax":
        return torch.softmax(logits, dim=-1) + bias
    if router.score_fn == "sigmoid":
        return torch.sigmoid(logits) + bias
    return logits + bias


def route_within(
    router: RouterSpec, logits: torch.Tensor, selection_bias: torch.Tensor | None, allowed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`route` for a different expert subset per token: ``allowed`` is a ``BoolTensor [T, E]``.

    Returns ``(index, weight)`` of shape ``[T, k]`` with indices into *all* experts (ready for :func:`combine`
    on ``[T, E, H]`` outputs). Each row is routed exactly as a model holding only that row's allowed experts
    would route it: top-min(k, |S|) within S, weights normalised over S. Picks outside S (rows with fewer
    than k allowed experts) get weight exactly 0. Rows that all equal one ``kept`` set agree with
    ``route(router, logits, selection_bias, kept)`` up to the index mapping ``kept[idx]``.
    """
    check_subset_routing(router)
    allowed = allowed.to(device=logits.device, dtype=torch.bool)
    logits = logits.float()
    bias = 0.0 if selection_bias is None else selection_bias.reshape(-1).float().to(logits.device)
    k = router.top_k
    if router.score_fn in ("softmax", "sigmoid"):
        scores = torch.softmax(logits.masked_fill(~allowed, _MASKED), dim=-1) if router.score_fn == "softmax" else torch.sigmoid(logits)
        idx = torch.topk((scores + bias).masked_fill(~allowed, _MASKED), k, dim=-1).indices
        weights = scores.gather(1, idx)
    else:
        idx = torch.topk((logits + bias).masked_fill(~allowed, _MASKED), k, dim=-1).indices
        top = logits.gather(1, idx).masked_fill(~allowed.gather(1, idx), _MASKED)
        weights = torch.softmax(top, dim=-1) if router.score_fn == "softmax_after_topk" else torch.sigmoid(top)
    weights = weights.masked_fill(~allowed.gather(1, idx), 0.0)
    if router.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return idx, weights * router.routed_scaling_factor
