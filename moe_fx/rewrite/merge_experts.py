"""MergeExperts: fold each dropped expert into a kept one of its block, then drop it.

What: after any scorer has decided which experts go (the same plan :class:`DropExperts` would apply),
every dropped expert ``d`` is averaged into the kept expert ``t`` of its block whose behaviour is closest,
and only then are the dropped experts removed. Per block and per target::

    W_t' = (f_t * W_t + sum_d f_d * P_d(W_d)) / (f_t + sum_d f_d)

with ``f`` the calibration routing ``count`` of each expert and ``P_d`` a permutation of ``d``'s
intermediate neurons that lines them up with ``t``'s (Hungarian matching, maximising the cosine
similarity of per-neuron feature vectors: gate row, up row, down column and per-neuron biases).

Why: dropping throws away what the dropped expert knew; the tokens it served fall back on other experts.
Merging keeps part of it in the expert most similar to it. Two experts' neurons are in arbitrary order
(any permutation of the intermediate neurons computes the same function), so averaging them unaligned
mixes unrelated neurons; aligning first makes the average of two functionally equal experts exact.
Weights are frequencies, so an expert no calibration token reached contributes nothing and a rarely
used one cannot wash out a busy target.

Target choice: mean cosine similarity of the experts' unweighted outputs on the sampled calibration tokens
(``sample_expert_out`` of the ``samples`` observer) when recorded, else cosine similarity of router rows.
Under group-limited routing (``n_group > 1``) the target is in the dropped expert's group.

``grouping="ream"`` (REAM, Jha et al. 2026, arXiv 2604.04356; ``--method ream``): the kept experts are the
centroids; in decreasing order of their score (REAP), each centroid takes the up to ``group_size - 1``
closest dropped experts not taken yet (REAM's "pseudo-pruning": the most salient experts absorb the dropped
ones, most kept experts stay untouched). Closeness is REAM's: the mean of (1) the cosine, mapped to [0, 1],
of the experts' *gated* mean outputs ``mean_t p_e(x_t) y_e(x_t)`` on the sampled tokens and (2) the
similarity of their router-logit columns over those tokens. A group is averaged with the experts' scores as
weights (REAM's saliency weighting), and each member's neurons are aligned to the centroid's by the sum of
the cosines of their activation profiles on the sampled tokens and of their weight features.

The statistic the weights come from, the alignment features and (REAM) the group size are options
(``weighting``, ``align``, ``group_size``); the defaults of each grouping are the ones its method describes.

Cost: one Hungarian matching per merged expert, O(I^3) in the intermediate width ``I`` (plus an ``I x I``
similarity matrix), on the CPU; small widths (<= 1024) take well under a second each, very wide experts
and many merged experts per block add up. Weights are averaged in at least float32.

Limits: only fused ``[E, ...]`` expert tensors (gate_up/up, down and their biases) are merged; any other
per-expert tensor (quantisation scales, ...) is refused with :class:`UnsupportedFamilyError`. The merged
expert keeps the target's router row, so routing is that of plain dropping; merging is a data-free
average (no fine-tuning), and experts whose functions differ a lot average into a worse expert than
either, which is why targets are picked by similarity.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moe_fx.errors import BadOptionError, UnsupportedFamilyError
from moe_fx.model.expert_math import ExpertMath
from moe_fx.model.expert_weights import neuron_features, neuron_tensors
from moe_fx.model.spec import ExpertsSpec, MoEBlockSpec
from moe_fx.model.tensors import get_tensor
from moe_fx.pipeline import MoEState, PassResult, require
from moe_fx.plan.plans import PrunePlan
from moe_fx.rewrite.drop_experts import DropExperts, expert_axis

__all__ = ["GROUPINGS", "MergeExperts", "align", "merge_block", "ream_distance", "ream_targets"]

GROUPINGS = ("nearest", "ream")


def align(reference: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The permutation ``perm`` of ``other``'s neurons (``other[perm]`` lines up with ``reference``) maximising
    the summed cosine similarity of matched feature rows, and the mean similarity of the matching."""
    from scipy.optimize import linear_sum_assignment

    sim = (F.normalize(reference.double(), dim=1) @ F.normalize(other.double(), dim=1).T).cpu()
    rows, cols = linear_sum_assignment(sim.numpy(), maximize=True)
    perm = torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long)
    return perm, float(sim[torch.arange(len(perm)), perm].mean())


# ---------------------------------------------------------------------------------------------------------
# target choice and merging


def _block_stat(state: MoEState, block: MoEBlockSpec, name: str, axis: int | None = 0) -> torch.Tensor | None:
    """A statistic of ``block`` indexed by its current experts along ``axis`` (mapped through earlier drops if
    recorded before; ``axis=None``: a statistic not per expert, as it is)."""
    stats = state.stats.per_block.get(block.path, {}) if state.stats is not None else {}
    if name not in stats:
        return None
    t = stats[name]
    if axis is None or t.ndim <= axis:
        return t
    positions = state.recorded_positions(block, t.shape[axis])
    return t if positions is None else t.index_select(axis, positions)


def _similarity(model: nn.Module, state: MoEState, block: MoEBlockSpec, rows: list[int]) -> tuple[torch.Tensor, str]:
    """``[len(rows), E]`` similarity of experts ``rows`` to every expert: the mean cosine of their unweighted
    outputs on the sampled calibration tokens if recorded, else the cosine of their router rows."""
    idx = torch.tensor(rows, dtype=torch.long)
    out = _block_stat(state, block, "sample_expert_out", axis=1)
    if out is not None:
        seen = _block_stat(state, block, "sample_seen")
        n = min(int(seen), out.shape[0]) if seen is not None else out.shape[0]
        if n > 0:
            x = F.normalize(out[:n].float(), dim=-1)  # [N, E, H]
            return torch.einsum("ndh,neh->de", x.index_select(1, idx), x) / n, "outputs"
    w = get_tensor(model, block.router.weight).detach().float()
    w = w.movedim(expert_axis(block.router.weight, w, block.num_experts), 0)
    w = F.normalize(w.reshape(block.num_experts, -1), dim=-1).cpu()
    return w.index_select(0, idx) @ w.T, "router"


def _routing_group(block: MoEBlockSpec, expert: int) -> int:
    """The routing group of ``expert`` (0 without group-limited routing): merges stay inside one group."""
    groups = block.router.n_group or 1
    return expert // (block.num_experts // groups) if groups > 1 else 0


def choose_targets(model: nn.Module, state: MoEState, block: MoEBlockSpec, kept: list[int]) -> tuple[dict[int, int], str]:
    """For each dropped expert, the most similar kept expert of the same routing group."""
    dropped = sorted(set(range(block.num_experts)) - set(kept))
    sim, source = _similarity(model, state, block, dropped)
    targets = {}
    for row, d in enumerate(dropped):
        candidates = [k for k in kept if _routing_group(block, k) == _routing_group(block, d)]
        if not candidates:
            raise BadOptionError(f"{block.path}: expert {d} has no kept expert in its routing group to merge into")
        targets[d] = max(candidates, key=lambda k: (float(sim[row, k]), -k))
    return targets, source


def _sampled(state: MoEState, block: MoEBlockSpec, name: str, axis: int | None = None) -> torch.Tensor | None:
    """The ``samples`` observer's statistic ``name`` cut to the tokens it really holds (None if not recorded)."""
    t = _block_stat(state, block, name, axis)
    seen = _block_stat(state, block, "sample_seen")
    if t is None or seen is None or int(seen) == 0:
        return None
    return t[: min(int(seen), t.shape[0])]


def ream_distance(state: MoEState, block: MoEBlockSpec) -> torch.Tensor | None:
    """``[E, E]`` REAM distance ``1 - (s_out + s_gate) / 2`` between the block's experts on the sampled tokens
    (None when no calibration token reached the block: a vision block under text calibration).

    ``s_out``: cosine of the experts' gated mean outputs ``mean_t p_e y_e`` (``p``: the router's probability
    of the expert), mapped to [0, 1]; ``s_gate``: ``1 - d / max d`` with ``d`` the euclidean distance of the
    unit-normalised router-logit columns (how alike the two experts' logits move over the tokens)."""
    out, logits = _sampled(state, block, "sample_expert_out", axis=1), _sampled(state, block, "sample_logits", axis=1)
    if out is None or logits is None:
        return None
    logits = logits.double()
    probs = torch.softmax(logits, -1) if block.router.score_fn.startswith("softmax") else torch.sigmoid(logits)
    gated = F.normalize((probs.unsqueeze(-1) * out.double()).mean(0), dim=-1)  # [E, H]
    s_out = (gated @ gated.T + 1) / 2
    cols = F.normalize(logits.T, dim=-1)
    d = torch.cdist(cols, cols)
    s_gate = 1 - d / d.max().clamp(min=1e-30)
    return 1 - (s_out + s_gate) / 2


def ream_targets(block: MoEBlockSpec, kept: list[int], score: torch.Tensor, distance: torch.Tensor, group_size: int) -> dict[int, int]:
    """REAM's pseudo-grouping: the kept experts, most salient first, each take the up to ``group_size - 1``
    closest dropped experts (same routing group) not taken yet; any dropped expert left over (too few
    centroids for the group size) goes to its closest kept expert."""
    free = set(range(block.num_experts)) - set(kept)
    targets: dict[int, int] = {}
    for c in sorted(kept, key=lambda k: (-float(score[k]), k)):
        near = sorted((d for d in free if _routing_group(block, d) == _routing_group(block, c)), key=lambda d: (float(distance[c, d]), d))
        for d in near[: group_size - 1]:
            targets[d] = c
            free.discard(d)
    for d in sorted(free):
        candidates = [k for k in kept if _routing_group(block, k) == _routing_group(block, d)]
        if not candidates:
            raise BadOptionError(f"{block.path}: expert {d} has no kept expert in its routing group to merge into")
        targets[d] = min(candidates, key=lambda k: (float(distance[k, d]), k))
    return targets


def activation_profiles(model: nn.Module, experts: ExpertsSpec, hidden: torch.Tensor | None) -> Callable[[int], torch.Tensor] | None:
    """``profile(e) -> [I, N]``: each intermediate neuron's activation over the sampled expert inputs
    ``hidden [N, H]`` (None when there are none or the experts' math cannot be reconstructed)."""
    if hidden is None or len(hidden) == 0:
        return None
    try:
        math = ExpertMath(model, experts)
    except UnsupportedFamilyError:
        return None
    device = get_tensor(model, experts.down).device
    x = hidden.to(device, torch.float32)
    return lambda e: math.activations(e, x).T.float().cpu()


@torch.no_grad()
def merge_block(
    model: nn.Module, experts: ExpertsSpec, targets: dict[int, int], weight: torch.Tensor,
    profile: Callable[[int], torch.Tensor] | None = None,
) -> list[float]:
    """Average every dropped expert (aligned) into its target in place; return each matching's mean similarity.

    ``targets``: dropped id -> kept id; ``weight [E]``: non-negative weights. A target whose group of experts
    has zero total weight is left unchanged. ``profile``: per-neuron activation profiles (see
    :func:`activation_profiles`); when given, neurons are matched on the mean of the cosines of their
    profiles and of their weight features, else on the weight features alone.
    """
    tensors, passive = neuron_tensors(model, experts)

    def features(e: int) -> torch.Tensor:
        w = neuron_features(model, tensors, e)
        if profile is None:
            return w
        return torch.cat([F.normalize(profile(e), dim=1), F.normalize(w, dim=1)], dim=1)

    by_target: dict[int, list[int]] = {}
    for d, t in targets.items():
        by_target.setdefault(t, []).append(d)
    quality = []
    for t, dropped in sorted(by_target.items()):
        weights = {e: float(weight[e]) for e in [t, *dropped]}
        total = sum(weights.values())
        if total <= 0:
            continue  # no calibration token reached any of them: nothing to weigh, keep the target
        dropped = [d for d in dropped if weights[d] > 0]  # an expert no token reached contributes nothing
        ref = features(t)
        perms = {}
        for d in dropped:
            perms[d], q = align(ref, features(d))
            quality.append(q)
        for name in [nt.name for nt in tensors] + passive:
            param = get_tensor(model, name)
            nt = next((x for x in tensors if x.name == name), None)
            dtype = torch.promote_types(param.dtype, torch.float32)
            acc = param[t].to(dtype) * weights[t]
            for d in dropped:
                w = param[d].to(dtype)
                acc += (nt.permuted(w, perms[d]) if nt is not None else w) * weights[d]
            param[t].copy_(acc / total)
    return quality


def _check_no_shared_storage(model: nn.Module, names: list[str]) -> None:
    seen: dict[int, str] = {}
    for name in names:
        t = get_tensor(model, name)
        storage = t.untyped_storage()
        if storage.nbytes() != t.numel() * t.element_size():
            raise RuntimeError(f"{name} is a view of a larger storage after merging; the saved model would not shrink")
        ptr = storage.data_ptr()
        if ptr in seen:
            raise RuntimeError(f"{name} shares storage with {seen[ptr]} after merging")
        seen[ptr] = name


@dataclass
class MergeExperts(DropExperts):
    """Fold each expert the plan drops into a kept expert, then drop it (see module doc).

    Options as :class:`DropExperts` (``ratio``/``keep``/``plan``/``allocation``), plus:

    - ``grouping``: ``"nearest"`` (each dropped expert into its most similar kept expert) or ``"ream"``
      (REAM's saliency-ordered groups of at most ``group_size`` experts; default ``max(2, E // 8)``, the
      paper's 16 of 128);
    - ``weighting``: what the average weighs experts by, ``"count"`` (routed calibration tokens) or
      ``"score"`` (the plan's expert scores, e.g. REAP); default count for nearest, score for ream;
    - ``align``: neurons matched on ``"weights"`` (weight features) or ``"activations"`` (activation profiles
      on the sampled tokens and weight features); default weights for nearest, activations for ream.

    Needs calibration statistics with the per-expert ``count`` (the ``routing`` observer) and, for ream or
    activation alignment, the ``samples`` observer (nearest also picks targets by output similarity with it).

    The merged expert keeps the *target's* router row (and router/selection biases): the row decides which
    tokens reach the expert, and the target's tokens are the ones it was kept for. Averaging router rows
    would move the decision boundary away from them, and which of the dropped expert's tokens should now
    go to which kept expert is not decided by any one row; the dropped row is removed by ``drop_experts``.
    """

    grouping: str = "nearest"
    group_size: int | None = None
    weighting: str | None = None
    align: str | None = None
    name = "merge_experts"

    def _options(self) -> tuple[str, str]:
        """The weighting and alignment in effect (the grouping's defaults where not given)."""
        if self.grouping not in GROUPINGS:
            raise BadOptionError(f"{self.name}: grouping must be one of {', '.join(GROUPINGS)}, got {self.grouping!r}")
        ream = self.grouping == "ream"
        weighting, align_on = self.weighting or ("score" if ream else "count"), self.align or ("activations" if ream else "weights")
        if weighting not in ("count", "score") or align_on not in ("weights", "activations"):
            raise BadOptionError(f"{self.name}: weighting must be count or score and align weights or activations, got "
                                 f"{weighting!r} and {align_on!r}")
        if self.group_size is not None and self.group_size < 2:
            raise BadOptionError(f"{self.name}: group_size must be at least 2 (a centroid and one merged expert), got {self.group_size}")
        return weighting, align_on

    def requires(self, state: MoEState) -> None:
        super().requires(state)
        weighting, align_on = self._options()
        require(state.stats is not None, self.name, "calibration statistics (per-expert routing counts)", "Calibrate(...)")
        needed = ["count"] + (["sample_expert_out", "sample_hidden"] if self.grouping == "ream" or align_on == "activations" else [])
        missing = [(b.path, k) for b in state.spec.blocks for k in needed if k not in state.stats.per_block.get(b.path, {})]
        require(not missing, self.name, f"the {missing[0][1] if missing else ''!r} statistic (missing for {missing[0][0] if missing else ''})",
                "Calibrate(observers=('routing', 'samples', ...))")
        if weighting == "score":
            require(state.scores is not None and state.scores.granularity == "expert", self.name, "per-expert scores to weigh merged experts by",
                    "Score(...) before merging, or weighting='count'")

    def _weights(self, state: MoEState, block: MoEBlockSpec, weighting: str) -> torch.Tensor:
        if weighting == "count":
            return _block_stat(state, block, "count").double().clamp(min=0)
        return state.scores.per_block[block.path].double().clamp(min=0)

    def _targets(self, model: nn.Module, state: MoEState, block: MoEBlockSpec, kept: list[int]) -> tuple[dict[int, int], str]:
        if self.grouping == "nearest":
            return choose_targets(model, state, block, kept)
        size = self.group_size or max(2, block.num_experts // 8)
        distance, source = ream_distance(state, block), "ream"
        if distance is None:  # no token reached the block: its scores are 0, so nothing is averaged in; group by router rows
            distance, source = 1 - _similarity(model, state, block, list(range(block.num_experts)))[0], "router"
        return ream_targets(block, kept, state.scores.per_block[block.path], distance, size), source

    def run(self, model: nn.Module, state: MoEState) -> PassResult:
        weighting, align_on = self._options()
        plan = self.make_plan(model, state)
        plan.validate(state.spec)
        original = state.plan or PrunePlan.keep_all(state.spec)
        merged, quality, sources, aligned, targets = 0, [], set(), set(), {}
        for block in state.spec.blocks:
            kept = plan.kept_experts.get(block.path)
            if kept is None or len(kept) == block.num_experts:
                continue
            chosen, source = self._targets(model, state, block, kept)
            sources.add(source)
            profile = activation_profiles(model, block.experts, _sampled(state, block, "sample_hidden")) if align_on == "activations" else None
            aligned.add("weights" if profile is None else "activations")  # what the block's matching used (no sample: weights)
            quality += merge_block(model, block.experts, chosen, self._weights(state, block, weighting), profile)
            merged += len(chosen)
            ids = original.kept_experts.get(block.path, list(range(block.num_experts)))
            targets[block.path] = {int(ids[d]): int(ids[t]) for d, t in chosen.items()}
        # drop with the very plan the merge used (make_plan is not asked twice)
        result = DropExperts.run(dataclasses.replace(self, plan=plan), model, state)
        for block in state.spec.blocks:
            if block.path in plan.kept_experts:
                _check_no_shared_storage(model, list(block.per_expert_tensors))
        result.report.update(
            merged=merged,
            grouping=self.grouping,
            weighting=weighting,
            align="+".join(sorted(aligned)) or align_on,
            similarity="+".join(sorted(sources)) or None,
            mean_alignment=round(sum(quality) / len(quality), 4) if quality else None,
            targets=targets,
        )
        return result
