"""DropExperts: remove routed experts (their fused weights, router rows and biases) following a plan."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BadOptionError
from ..pipeline import MoEState, Pass, PassResult, require
from ..plan import PrunePlan
from ..rewrite import get_tensor, set_attr, set_config_key, set_tensor
from ..spec import MoEBlockSpec, MoEModelSpec
from .allocate import uniform_plan


def _resized(block: MoEBlockSpec, n: int) -> MoEBlockSpec:
    return dataclasses.replace(block, experts=dataclasses.replace(block.experts, num_experts=n))


def _expert_axis(name: str, t: torch.Tensor, num_experts: int) -> int:
    """The axis of ``t`` that indexes experts: the first, else the only one of size E (Ernie's ``[1, E]`` bias)."""
    if t.shape[0] == num_experts:
        return 0
    axes = [i for i, size in enumerate(t.shape) if size == num_experts]
    if len(axes) != 1:
        raise BadOptionError(f"{name}: cannot tell which axis of shape {tuple(t.shape)} indexes the {num_experts} experts")
    return axes[0]


def drop_experts(model: nn.Module, spec: MoEModelSpec, plan: PrunePlan) -> MoEModelSpec:
    """Slice every per-expert tensor of each planned block to the kept ids; return the updated spec.

    Router rows, router bias and selection (correction) bias are sliced with the experts so routing over
    the kept experts is unchanged: a token whose top-k experts are all kept gets the same output (for
    families that renormalise top-k weights). Counts are updated on modules and in the config (every alias).
    Stock configs hold one count for all layers, so kept counts must be equal across blocks.
    """
    plan.validate(spec)
    counts = {len(plan.kept_experts.get(b.path, range(b.num_experts))) for b in spec.blocks}
    if len(counts) > 1:
        raise BadOptionError(
            f"blocks would keep different expert counts {sorted(counts)}; stock transformers configs hold one "
            "count for all layers, so use a uniform plan"
        )
    blocks = []
    for block in spec.blocks:
        kept = plan.kept_experts.get(block.path)
        if kept is None:
            blocks.append(block)
            continue
        for name in block.per_expert_tensors:
            t = get_tensor(model, name)
            idx = torch.tensor(kept, dtype=torch.long, device=t.device)
            set_tensor(model, name, t.detach().index_select(_expert_axis(name, t, block.num_experts), idx).clone())
        for ref in block.router.count_attrs + block.count_attrs:
            set_attr(model, ref, len(kept))
        blocks.append(_resized(block, len(kept)))
    (n,) = counts
    for ref in spec.config_count_keys:
        set_config_key(model.config, ref, n)
    return dataclasses.replace(spec, blocks=tuple(blocks))


@dataclass
class DropExperts(Pass):
    """Drop the lowest-scoring experts of every block (uniform), or apply an explicit ``plan``.

    ``ratio``: fraction of each block's experts to drop; ``keep``: experts to keep per block.
    """

    ratio: float | None = None
    keep: int | None = None
    plan: PrunePlan | None = None
    name = "drop_experts"

    def requires(self, state: MoEState) -> None:
        if self.plan is None:
            require(state.scores is not None, self.name, "expert scores", "Score(...)")

    def run(self, model: nn.Module, state: MoEState) -> PassResult:
        plan = self.plan or uniform_plan(state.spec, state.scores.per_block, ratio=self.ratio, keep=self.keep)
        before = sum(b.num_experts for b in state.spec.blocks)
        modified = plan.kept_experts != PrunePlan.keep_all(state.spec).kept_experts
        state.spec = drop_experts(model, state.spec, plan)
        # record kept ids in terms of the original experts, also after several DropExperts passes
        state.plan = plan if state.plan is None else state.plan.then(plan)
        after = sum(b.num_experts for b in state.spec.blocks)
        return PassResult(model, modified, {"experts_before": before, "experts_after": after})
