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
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moe_fx.errors import BadOptionError
from moe_fx.model.expert_weights import neuron_features, neuron_tensors
from moe_fx.model.spec import ExpertsSpec, MoEBlockSpec
from moe_fx.model.tensors import get_tensor
from moe_fx.pipeline import MoEState, PassResult, require
from moe_fx.plan.plans import PrunePlan
from moe_fx.rewrite.drop_experts import DropExperts, expert_axis

__all__ = ["MergeExperts", "align", "merge_block"]


def align(reference: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The permutation ``perm`` of ``other``'s neurons (``other[perm]`` lines up with ``reference``) maximising
    the summed cosine similarity of matched feature rows, and the mean similarity of the matching."""
    from scipy.optimize import linear_sum_assignment

    sim = (F.normalize(reference.double(), dim=1) @ F.normalize(other.double(), dim=1).T).cpu()
    rows, cols = linear_sum_assignment(sim.cpu().numpy(), maximize=True)
    perm = torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long)
    return perm, float(sim[torch.arange(len(perm)), perm].mean())


# ---------------------------------------------------------------------------------------------------------
# target choice and merging


def _block_stat(state: MoEState, block: MoEBlockSpec, name: str, axis: int = 0) -> torch.Tensor | None:
    """A statistic of ``block`` indexed by its current experts (mapped through earlier drops if recorded before)."""
    stats = state.stats.per_block.get(block.path, {}) if state.stats is not None else {}
    if name not in stats:
        return None
    t = stats[name]
    if t.ndim <= axis:
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


def choose_targets(model: nn.Module, state: MoEState, block: MoEBlockSpec, kept: list[int]) -> tuple[dict[int, int], str]:
    """For each dropped expert, the most similar kept expert of the same routing group."""
    dropped = sorted(set(range(block.num_experts)) - set(kept))
    sim, source = _similarity(model, state, block, dropped)
    groups = block.router.n_group or 1
    size = block.num_experts // groups
    targets = {}
    for row, d in enumerate(dropped):
        candidates = [k for k in kept if groups == 1 or k // size == d // size]
        if not candidates:
            raise BadOptionError(f"{block.path}: expert {d} has no kept expert in its routing group to merge into")
        targets[d] = max(candidates, key=lambda k: (float(sim[row, k]), -k))
    return targets, source


@torch.no_grad()
def merge_block(model: nn.Module, experts: ExpertsSpec, targets: dict[int, int], freq: torch.Tensor) -> list[float]:
    """Average every dropped expert (aligned) into its target in place; return each matching's mean similarity.

    ``targets``: dropped id -> kept id; ``freq [E]``: non-negative weights. A target whose group of experts
    has zero total weight is left unchanged.
    """
    tensors, passive = neuron_tensors(model, experts)
    by_target: dict[int, list[int]] = {}
    for d, t in targets.items():
        by_target.setdefault(t, []).append(d)
    quality = []
    for t, dropped in sorted(by_target.items()):
        weights = {e: float(freq[e]) for e in [t, *dropped]}
        total = sum(weights.values())
        if total <= 0:
            continue  # no calibration token reached any of them: nothing to weigh, keep the target
        dropped = [d for d in dropped if weights[d] > 0]  # an expert no token reached contributes nothing
        ref = neuron_features(model, tensors, t)
        perms = {}
        for d in dropped:
            perms[d], q = align(ref, neuron_features(model, tensors, d))
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
    """Fold each expert the plan drops into the most similar kept expert, then drop it (see module doc).

    Options as :class:`DropExperts` (``ratio``/``keep``/``plan``/``allocation``); needs calibration
    statistics with the per-expert ``count`` (the ``routing`` observer; add ``samples`` to pick targets
    by output similarity).

    The merged expert keeps the *target's* router row (and router/selection biases): the row decides which
    tokens reach the expert, and the target's tokens are the ones it was kept for. Averaging router rows
    would move the decision boundary away from them, and which of the dropped expert's tokens should now
    go to which kept expert is not decided by any one row; the dropped row is removed by ``drop_experts``.
    """

    name = "merge_experts"

    def requires(self, state: MoEState) -> None:
        super().requires(state)
        require(state.stats is not None, self.name, "calibration statistics (per-expert routing counts)", "Calibrate(...)")
        missing = [b.path for b in state.spec.blocks if "count" not in state.stats.per_block.get(b.path, {})]
        require(not missing, self.name, f"the per-expert 'count' statistic (missing for {missing[:2]})",
                "Calibrate(observers=('routing', ...))")

    def run(self, model: nn.Module, state: MoEState) -> PassResult:
        plan = self.make_plan(model, state)
        plan.validate(state.spec)
        original = state.plan or PrunePlan.keep_all(state.spec)
        merged, quality, sources, targets = 0, [], set(), {}
        for block in state.spec.blocks:
            kept = plan.kept_experts.get(block.path)
            if kept is None or len(kept) == block.num_experts:
                continue
            chosen, source = choose_targets(model, state, block, kept)
            sources.add(source)
            freq = _block_stat(state, block, "count").double().clamp(min=0)
            quality += merge_block(model, block.experts, chosen, freq)
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
            similarity="+".join(sorted(sources)) or None,
            mean_alignment=round(sum(quality) / len(quality), 4) if quality else None,
            targets=targets,
        )
        return result
