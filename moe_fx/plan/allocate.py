"""Allocation: turn per-expert scores into a :class:`PrunePlan` under a budget."""

from __future__ import annotations

import torch

from moe_fx.errors import BadOptionError
from moe_fx.model.spec import MoEBlockSpec, MoEModelSpec
from moe_fx.plan.plans import PrunePlan


def experts_to_keep(num_experts: int, ratio: float | None, keep: int | None) -> int:
    """How many experts a block keeps for a drop ``ratio`` (fraction dropped) or an explicit ``keep``."""
    if (ratio is None) == (keep is None):
        raise BadOptionError("give exactly one of ratio (fraction of experts to drop) or keep (experts to keep)")
    if keep is None:
        if not 0.0 < ratio < 1.0:
            raise BadOptionError(f"ratio must be in (0, 1): the fraction of experts to drop; got {ratio}")
        keep = num_experts - int(round(ratio * num_experts))
    if not 0 < keep <= num_experts:
        raise BadOptionError(f"keep must be in [1, {num_experts}], got {keep}")
    return keep


def _top(scores: torch.Tensor, ids: list[int], n: int) -> list[int]:
    """The ``n`` best of ``ids`` by score; ties broken by the lower id so plans are deterministic."""
    order = sorted(ids, key=lambda i: (-float(scores[i]), i))
    return sorted(order[:n])


def _block_keep(block: MoEBlockSpec, scores: torch.Tensor, keep: int) -> list[int]:
    groups = block.router.n_group or 1
    if groups == 1:
        return _top(scores, list(range(block.num_experts)), keep)
    if keep % groups:
        raise BadOptionError(
            f"{block.path}: group-limited routing with n_group={groups} drops experts per group, so the kept count "
            f"must be a multiple of {groups}; {keep} is not (choose a ratio that keeps a multiple of {groups})"
        )
    size = block.num_experts // groups
    return [i for g in range(groups) for i in _top(scores, list(range(g * size, (g + 1) * size)), keep // groups)]


def uniform_plan(spec: MoEModelSpec, scores: dict[str, torch.Tensor], *, ratio: float | None = None, keep: int | None = None) -> PrunePlan:
    """Keep the same number of best-scoring experts in every block (higher score = more important)."""
    plan = PrunePlan()
    for block in spec.blocks:
        n = experts_to_keep(block.num_experts, ratio, keep)
        plan.kept_experts[block.path] = _block_keep(block, scores[block.path], n)
    plan.validate(spec)
    return plan


def shared_layers(spec: MoEModelSpec) -> list[int]:
    """Decoder layers holding more than one expert block (Ernie-VL's text and vision experts): their blocks must
    keep equal counts (some checkpoints store them concatenated), so no slot can move between them alone."""
    blocks_of: dict[int, int] = {}
    for b in spec.blocks:
        if b.layer_index is not None:
            blocks_of[b.layer_index] = blocks_of.get(b.layer_index, 0) + 1
    return sorted(layer for layer, n in blocks_of.items() if n > 1)


def check_allocation(spec: MoEModelSpec, allocation: str) -> None:
    """Refuse, before any calibration, an allocation this model's layout cannot take."""
    if allocation not in ALLOCATIONS:
        raise BadOptionError(f"unknown allocation {allocation!r}; use one of {sorted(ALLOCATIONS)}")
    shared = shared_layers(spec) if allocation == "global" else []
    if shared:
        raise BadOptionError(
            f"--allocation global moves experts between blocks, but decoder layers {shared[:4]}{' ...' if len(shared) > 4 else ''} "
            "hold several expert blocks that must keep equal counts (the checkpoint stores them together); use --allocation uniform"
        )


def global_plan(
    spec: MoEModelSpec, scores: dict[str, torch.Tensor], *, ratio: float | None = None, keep: int | None = None, min_keep: int | None = None
) -> PrunePlan:
    """Keep the same *total* number of experts as :func:`uniform_plan`, ranked across all blocks.

    Scores are divided by their block's mean first, so the ranking compares how much more an expert matters
    than its block's average expert: scale-free, so blocks whose outputs are larger (or scorers whose units
    differ by layer) do not take every slot. Each block keeps at least ``min_keep`` experts (default: its
    top-k, the least the router can run with). Group-limited blocks keep a multiple of ``n_group``.
    """
    check_allocation(spec, "global")
    budget = sum(experts_to_keep(b.num_experts, ratio, keep) for b in spec.blocks)
    floors = {b.path: max(b.top_k, min_keep or 0) for b in spec.blocks}
    if any(floors[b.path] > b.num_experts for b in spec.blocks) or sum(floors.values()) > budget:
        raise BadOptionError(f"min_keep={min_keep} needs more experts than the budget of {budget} allows")
    ranked = []
    for bi, block in enumerate(spec.blocks):
        s = scores[block.path].double()
        rel = s / s.mean().clamp(min=1e-30) if float(s.mean()) > 0 else torch.zeros_like(s)
        ranked += [(-float(rel[i]), bi, i) for i in range(block.num_experts)]
    counts = dict(floors)
    extra = budget - sum(counts.values())
    # each block's own best experts fill its floor; the rest of the budget goes to the best remaining experts
    within = {b.path: sorted(range(b.num_experts), key=lambda i, b=b: (-float(scores[b.path][i]), i)) for b in spec.blocks}
    floor_sets = {p: set(within[p][: counts[p]]) for p in within}
    for _, bi, i in sorted(ranked):
        if extra == 0:
            break
        path = spec.blocks[bi].path
        if i not in floor_sets[path]:
            counts[path] += 1
            extra -= 1
    plan = PrunePlan()
    for block in spec.blocks:
        n = counts[block.path]
        groups = block.router.n_group or 1
        n = max(groups * 2 if groups > 1 else n, n - n % groups)
        plan.kept_experts[block.path] = _block_keep(block, scores[block.path], n)
    plan.validate(spec)
    return plan


ALLOCATIONS = {"uniform": uniform_plan, "global": global_plan}


def make_plan(spec: MoEModelSpec, scores: dict[str, torch.Tensor], *, ratio: float | None = None, keep: int | None = None, allocation: str = "uniform") -> PrunePlan:
    """A plan under the budget by ``allocation``: ``uniform`` (same count per block) or ``global`` (ranked across blocks)."""
    check_allocation(spec, allocation)
    return ALLOCATIONS[allocation](spec, scores, ratio=ratio, keep=keep)


def check_budget(spec: MoEModelSpec, *, ratio: float | None = None, keep: int | None = None) -> None:
    """Fail before any calibration work if the budget cannot be met in some block."""
    for block in spec.blocks:
        n = experts_to_keep(block.num_experts, ratio, keep)
        if n < block.top_k:
            raise BadOptionError(
                f"{block.path}: dropping to {n} of {block.num_experts} experts leaves fewer than top-k={block.top_k}; "
                f"use a ratio of at most {1 - block.top_k / block.num_experts:.3f}"
            )
        groups = block.router.n_group or 1
        if n % groups:
            raise BadOptionError(f"{block.path}: group-limited routing (n_group={groups}) needs the kept count ({n}) to be a multiple of {groups}")
