"""Channel allocation: turn per-channel scores ``[E, I]`` per block into a :class:`ChannelPlan` under a budget.

The budget is a fraction ``ratio`` of the routed experts' channels to remove. Every channel of a block costs
the same parameters (a gate/up row and a down column), so on a model whose blocks share one width it is the
same fraction of routed-FFN parameters. Allocations:

- ``uniform``: every expert keeps the same number of its best channels (stock config, stock kernels).
- ``layer``: one width per block, from a ranking of all channels across blocks (per-layer format).
- ``expert``: each expert keeps its channels among the best across the model (HEAPr's global ranking of
  atomic experts); widths differ per expert, an expert left with none is dropped.
- ``buckets``: ``expert``'s global ranking, with the widths of each block grouped into at most
  :data:`~moe_fx.plan.buckets.MAX_BUCKETS` widths (multiples of 8; :func:`~moe_fx.plan.buckets.plan_buckets`), each
  expert widened to its bucket's width with its next best channels (the bucket stores them anyway), and the ranking
  cut so that the *stored* channels meet the budget. Saved in width buckets (:mod:`moe_fx.formats.ragged`), the
  checkpoint stores exactly the budget, where ``expert``'s zero-padded widths store nearly everything.
- ``buckets-per-layer``: ``buckets`` within each block alone, each block removing ``ratio`` of its own channels: what a
  streamed prune can plan one layer at a time (per-expert widths still follow the block's ranking).
- ``coverage``: Ding et al. (arXiv 2606.18304): per block, keep the fewest channels that cover the same
  fraction of the block's total channel score (binary search on that fraction to meet the budget), then
  split the block's channels between its experts by covering a share of each expert's score mass that grows
  with the square root of its expert attribution score, and keep each expert's best channels.

Scores that estimate a loss change (Fisher, HEAPr) compare across blocks as they are; other scores are
divided by their block's mean first (the scorer's ``comparable_across_blocks`` says which).
"""

from __future__ import annotations

import dataclasses
import heapq
import math

import torch

from moe_fx.errors import BadOptionError
from moe_fx.model.spec import MoEBlockSpec, MoEModelSpec
from moe_fx.plan.buckets import MAX_BUCKETS, plan_buckets
from moe_fx.plan.plans import WIDTH_ALIGN, ChannelPlan, width_step

ChannelScores = dict[str, torch.Tensor]
"""Per block path, ``[E, I]`` float64 channel importances (higher = keep)."""


def channels_to_keep(total: int, ratio: float, align: int = 1) -> int:
    """Channels left of ``total`` after removing the fraction ``ratio``, rounded to a multiple of ``align``."""
    if not 0.0 < ratio < 1.0:
        raise BadOptionError(f"ratio must be in (0, 1): the fraction of routed-expert channels to remove; got {ratio}")
    return _aligned(total - ratio * total, align, total)


def _aligned(n: float, align: int, most: int) -> int:
    """``n`` rounded to the nearest positive multiple of ``align``, at most ``most``."""
    return min(most, max(align, align * round(n / align)))


def _best(scores: torch.Tensor, counts: list[int]) -> list[list[int]]:
    """Per expert (a row of ``scores``), its ``counts[e]`` best channel ids, ascending; ties to the lower id
    (deterministic: a stable sort of the negated scores). One sort for the block: ranking each expert's channels in
    Python, a scalar read per channel, took 0.3 s a layer of Qwen3-30B-A3B."""
    order = torch.sort(-scores, dim=1, stable=True).indices
    return [sorted(order[e, :n].tolist()) for e, n in enumerate(counts)]


def _plan(spec: MoEModelSpec, scores: ChannelScores, counts: dict[str, list[int]], multiple: int, align: int) -> ChannelPlan:
    plan = ChannelPlan({b.path: _best(scores[b.path], counts[b.path]) for b in spec.blocks}, multiple, align)
    plan.validate(spec)
    return plan


def _check(spec: MoEModelSpec, scores: ChannelScores) -> None:
    for b in spec.blocks:
        s = scores.get(b.path)
        if s is None or tuple(s.shape) != (b.num_experts, b.experts.intermediate_size):
            got = None if s is None else tuple(s.shape)
            raise BadOptionError(
                f"{b.path}: channel scores of shape {got} do not fit its {b.num_experts} experts x {b.experts.intermediate_size} "
                "channels; score with a channel method (Score('fisher'), ...) after the last pass that changed the experts"
            )


def _comparable(spec: MoEModelSpec, scores: ChannelScores, comparable: bool) -> ChannelScores:
    if comparable:
        return scores
    return {b.path: scores[b.path] / scores[b.path].mean().clamp(min=1e-30) for b in spec.blocks}


def uniform_widths(spec: MoEModelSpec, ratio: float, align: int = WIDTH_ALIGN) -> dict[str, int]:
    """Each block's width after removing ``ratio`` of its channels in steps of :func:`~moe_fx.plan.plans.width_step`; a
    block the rounding leaves whole is refused (a prune that removes nothing is a mistake to say, not to run)."""
    widths = {}
    for b in spec.blocks:
        width, step = b.experts.intermediate_size, width_step(b.experts.intermediate_size, align)
        widths[b.path] = channels_to_keep(width, ratio, step)
        if widths[b.path] == width:
            raise BadOptionError(f"{b.path}: removing {ratio:g} of its {width} channels in steps of {step} "
                                 f"keeps them all; give a ratio above {step / 2 / width:.3g}, or drop experts")
    return widths


def uniform_channels(spec: MoEModelSpec, scores: ChannelScores, ratio: float, *, align: int = WIDTH_ALIGN, **_) -> ChannelPlan:
    _check(spec, scores)
    widths = uniform_widths(spec, ratio, align)
    counts = {b.path: [widths[b.path]] * b.num_experts for b in spec.blocks}
    return _plan(spec, scores, counts, 1, align)


def _global_counts(spec: MoEModelSpec, scores: ChannelScores, ratio: float) -> dict[str, torch.Tensor]:
    """Per block, ``[E]``: how many of each expert's channels are among the model's best (the budget)."""
    flat = torch.cat([scores[b.path].flatten() for b in spec.blocks])
    keep = channels_to_keep(flat.numel(), ratio)
    # a stable sort on (-score) keeps ties in block/expert/channel order: deterministic
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.sort(-flat, stable=True).indices[:keep]] = True
    out, start = {}, 0
    for b in spec.blocks:
        n = scores[b.path].numel()
        out[b.path] = chosen[start : start + n].view_as(scores[b.path]).sum(1)
        start += n
    return out


def bucket_channels(spec: MoEModelSpec, scores: ChannelScores, ratio: float, *, comparable: bool = False,
                    buckets: int = MAX_BUCKETS, align: int = WIDTH_ALIGN, **_) -> ChannelPlan:
    """The ``buckets`` allocation (module doc): the largest cut of the global ranking whose bucketed widths store at
    most the budget's channels (binary search: the stored channels only grow with the cut)."""
    _check(spec, scores)
    ranked = _comparable(spec, scores, comparable)
    flat = torch.cat([ranked[b.path].flatten() for b in spec.blocks])
    order = torch.sort(-flat, stable=True).indices
    budget = channels_to_keep(flat.numel(), ratio)

    def widths(cut: int) -> tuple[dict[str, list[int]], int]:
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        chosen[order[:cut]] = True
        out, start, stored = {}, 0, 0
        for b in spec.blocks:
            n = ranked[b.path].numel()
            counts = _floor_experts(b, chosen[start : start + n].view_as(ranked[b.path]).sum(1).tolist(), ranked[b.path])
            if (b.router.n_group or 1) > 1:  # group-limited routing keeps equal groups: no expert is dropped
                counts = [max(1, c) for c in counts]
            start += n
            live = [e for e, c in enumerate(counts) if c]
            width = [0] * len(counts)
            step = width_step(b.experts.intermediate_size, align)
            for w, members in plan_buckets([counts[e] for e in live], buckets, step, most=b.experts.intermediate_size):
                for i in members:
                    width[live[i]] = w
            out[b.path] = width
            stored += sum(width)
        return out, stored

    lo, hi = 1, budget  # widths(cut) stores at least cut channels, so the answer is at most the budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if widths(mid)[1] <= budget else (lo, mid - 1)
    return _plan(spec, scores, widths(lo)[0], 1, align)


def layer_bucket_channels(spec: MoEModelSpec, scores: ChannelScores, ratio: float, *, buckets: int = MAX_BUCKETS, align: int = WIDTH_ALIGN,
                          **_) -> ChannelPlan:
    """The ``buckets-per-layer`` allocation (module doc): :func:`bucket_channels` on each block alone (a block's own scores
    rank alike whatever their scale, so ``comparable`` does not matter)."""
    kept = {}
    for b in spec.blocks:
        kept.update(bucket_channels(dataclasses.replace(spec, blocks=(b,)), scores, ratio, buckets=buckets, align=align).kept_channels)
    plan = ChannelPlan(kept, 1, align)
    plan.validate(spec)
    return plan


def _floor_experts(block: MoEBlockSpec, counts: list[int], scores: torch.Tensor) -> list[int]:
    """Keep at least top-k experts with a channel (the router needs k): revive the best-scoring empty ones."""
    alive = sum(1 for c in counts if c > 0)
    order = sorted(range(len(counts)), key=lambda e: (-float(scores[e].max()), e))
    for e in order:
        if alive >= block.top_k:
            break
        if counts[e] == 0:
            counts[e] = 1
            alive += 1
    return counts


def layer_channels(spec: MoEModelSpec, scores: ChannelScores, ratio: float, *, comparable: bool = False, align: int = WIDTH_ALIGN,
                   **_) -> ChannelPlan:
    """One width per block, chosen to keep the most total score under the budget: every block starts at one step
    (:func:`~moe_fx.plan.plans.width_step`) of channels per expert, then the budget goes, a step of channels per
    expert at a time, to the block whose experts' next-best channels add the most score (exact for these nested
    choices, since each block's gains only fall as it widens)."""
    _check(spec, scores)
    ranked = _comparable(spec, scores, comparable)
    budget = channels_to_keep(sum(b.num_experts * b.experts.intermediate_size for b in spec.blocks), ratio)
    gains = {b.path: torch.sort(ranked[b.path], dim=1, descending=True).values.sum(0) for b in spec.blocks}
    steps = {b.path: width_step(b.experts.intermediate_size, align) for b in spec.blocks}
    widths = {b.path: min(steps[b.path], b.experts.intermediate_size) for b in spec.blocks}
    used = sum(b.num_experts * widths[b.path] for b in spec.blocks)
    step = lambda b: float(gains[b.path][widths[b.path] : widths[b.path] + steps[b.path]].sum())
    heap = [(-step(b), i) for i, b in enumerate(spec.blocks) if widths[b.path] < b.experts.intermediate_size]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        b = spec.blocks[i]
        grow = min(steps[b.path], b.experts.intermediate_size - widths[b.path])
        if used + b.num_experts * grow > budget:
            continue
        widths[b.path] += grow
        used += b.num_experts * grow
        if widths[b.path] < b.experts.intermediate_size:
            heapq.heappush(heap, (-step(b), i))
    return _plan(spec, scores, {b.path: [widths[b.path]] * b.num_experts for b in spec.blocks}, 1, align)


def expert_channels(spec: MoEModelSpec, scores: ChannelScores, ratio: float, *, comparable: bool = False, multiple: int = 64,
                    align: int = WIDTH_ALIGN, **_) -> ChannelPlan:
    _check(spec, scores)
    ranked = _comparable(spec, scores, comparable)
    counts = _global_counts(spec, ranked, ratio)
    per_block = {b.path: _floor_experts(b, counts[b.path].tolist(), ranked[b.path]) for b in spec.blocks}
    return _plan(spec, ranked, per_block, multiple, align)


def _coverage_count(cum: torch.Tensor, fraction: float) -> int:
    """The fewest channels (best first) whose cumulative score reaches ``fraction`` of the total."""
    total = float(cum[-1])
    if total <= 0:
        return math.ceil(cum.numel() * min(1.0, fraction))
    return min(cum.numel(), 1 + int(torch.searchsorted(cum, cum.new_tensor(fraction * total))))


def _bisect(count, target: int, lo: float, hi: float, iters: int = 40) -> float:
    """The parameter in ``[lo, hi]`` whose (non-decreasing) ``count`` is closest to ``target``."""
    best = (abs(count(hi) - target), hi)
    for _ in range(iters):
        mid = (lo + hi) / 2
        n = count(mid)
        best = min(best, (abs(n - target), mid))
        if n < target:
            lo = mid
        elif n > target:
            hi = mid
        else:
            break
    return best[1]


def coverage_channels(
    spec: MoEModelSpec, scores: ChannelScores, ratio: float, *, expert_scores: dict[str, torch.Tensor] | None = None, multiple: int = 64,
    align: int = WIDTH_ALIGN, **_
) -> ChannelPlan:
    """Ding et al.'s coverage allocation (see module doc); ``expert_scores``: per block ``[E]`` attribution scores
    (default: each expert's total channel score). Channel scores are compared within a block only."""
    _check(spec, scores)
    sorted_cum = {}
    for b in spec.blocks:
        v = scores[b.path].clamp(min=0).flatten()
        sorted_cum[b.path] = torch.sort(v / v.mean().clamp(min=1e-30), descending=True).values.cumsum(0)
    total = sum(b.num_experts * b.experts.intermediate_size for b in spec.blocks)
    budget = channels_to_keep(total, ratio)
    per_block = lambda s: {p: _coverage_count(c, s) for p, c in sorted_cum.items()}
    s = _bisect(lambda s: sum(per_block(s).values()), budget, 0.0, 1.0)
    block_keep = per_block(s)
    counts = {}
    for b in spec.blocks:
        attribution = (expert_scores or {}).get(b.path)
        if attribution is None:
            attribution = scores[b.path].clamp(min=0).sum(1)
        counts[b.path] = _floor_experts(b, _split_block(scores[b.path], attribution.double(), block_keep[b.path]), scores[b.path])
    return _plan(spec, scores, counts, multiple, align)


def _split_block(scores: torch.Tensor, attribution: torch.Tensor, keep: int) -> list[int]:
    """Per expert of one block, how many channels to keep so the block keeps ``keep``: expert ``e`` covers the
    share ``min(1, w_e mu)`` of its score mass, ``w_e`` ~ sqrt(attribution); ``mu`` is bisected to the budget and
    the rest is settled one channel at a time by the best next (or worst last) attribution-scaled score."""
    e_count, width = scores.shape
    w = attribution.clamp(min=0).sqrt()
    w = (w / w.sum().clamp(min=1e-30)).clamp(min=1e-6)
    ordered = torch.sort(scores.clamp(min=0), dim=1, descending=True).values
    cum = ordered.cumsum(1)
    count = lambda mu: [_coverage_count(cum[e], min(1.0, float(w[e]) * mu)) for e in range(e_count)]
    counts = count(_bisect(lambda mu: sum(count(mu)), keep, 0.0, 1.05 / float(w.min())))
    scaled = ordered * attribution.clamp(min=0)[:, None]
    while sum(counts) != keep:
        grow = sum(counts) < keep
        candidates = [e for e in range(e_count) if (counts[e] < width if grow else counts[e] > 0)]
        pick = max if grow else min
        e = pick(candidates, key=lambda e: (float(scaled[e, counts[e] if grow else counts[e] - 1]), -e))
        counts[e] += 1 if grow else -1
    return counts


CHANNEL_ALLOCATIONS = {"uniform": uniform_channels, "layer": layer_channels, "expert": expert_channels, "buckets": bucket_channels,
                       "buckets-per-layer": layer_bucket_channels, "coverage": coverage_channels}
LAYERWISE_ALLOCATIONS = frozenset({"uniform", "buckets-per-layer"})
"""Allocations that plan each block from its own scores alone (the others share one budget across blocks)."""


def make_channel_plan(spec: MoEModelSpec, scores: ChannelScores, ratio: float, allocation: str = "uniform", **options) -> ChannelPlan:
    """A channel plan removing ``ratio`` of the routed experts' channels, allocated by ``allocation``; ``options``:
    the allocation's (``comparable``, ``multiple``, ``expert_scores``, ``buckets``), and ``align``, the block of the
    output format (:func:`~moe_fx.plan.plans.width_step`: fp8-block's 128) that every allocation's widths respect."""
    if allocation not in CHANNEL_ALLOCATIONS:
        raise BadOptionError(f"unknown channel allocation {allocation!r}; use one of {sorted(CHANNEL_ALLOCATIONS)}")
    return CHANNEL_ALLOCATIONS[allocation](spec, scores, ratio, **options)
