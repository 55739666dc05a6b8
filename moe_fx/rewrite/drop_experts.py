"""DropExperts: remove routed experts (their fused weights, router rows and biases) following a plan."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe_fx.errors import BadOptionError
from moe_fx.model.layout import record_layout
from moe_fx.model.spec import MoEBlockSpec, MoEModelSpec
from moe_fx.model.tensors import get_tensor, set_attr, set_tensor
from moe_fx.pipeline import MoEState, Pass, PassResult, require
from moe_fx.plan.allocate import make_plan
from moe_fx.plan.plans import PrunePlan


def _resized(block: MoEBlockSpec, n: int) -> MoEBlockSpec:
    return dataclasses.replace(block, experts=dataclasses.replace(block.experts, num_experts=n))


def expert_axis(name: str, t: torch.Tensor, num_experts: int) -> int:
    """The axis of ``t`` that indexes experts: the first, else the only one of size E (Ernie's ``[1, E]`` bias)."""
    if t.shape[0] == num_experts:
        return 0
    axes = [i for i, size in enumerate(t.shape) if size == num_experts]
    if len(axes) != 1:
        raise BadOptionError(f"{name}: cannot tell which axis of shape {tuple(t.shape)} indexes the {num_experts} experts")
    return axes[0]


def drop_experts(model: nn.Module, spec: MoEModelSpec, plan: PrunePlan, *, update_config: bool = True) -> MoEModelSpec:
    """Slice every per-expert tensor of each planned block to the kept ids; return the updated spec.

    Router rows, router bias and selection (correction) bias are sliced with the experts so routing over
    the kept experts is unchanged: a token whose top-k experts are all kept gets the same output (for
    families that renormalise top-k weights). Counts are updated on modules and in the config (every alias).
    Stock configs hold one count for all layers; when blocks keep different counts, the config holds the
    largest and ``config.moe_fx_layout`` records each block's shapes (:func:`moe_fx.model.layout.record_layout`),
    which the saved checkpoint loads. ``update_config=False`` skips that (a throw-away view being measured).
    """
    plan.validate(spec)
    blocks = []
    for block in spec.blocks:
        kept = plan.kept_experts.get(block.path)
        if kept is None:
            blocks.append(block)
            continue
        for name in block.per_expert_tensors:
            t = get_tensor(model, name)
            idx = torch.tensor(kept, dtype=torch.long, device=t.device)
            set_tensor(model, name, t.detach().index_select(expert_axis(name, t, block.num_experts), idx).clone())
        for ref in block.router.count_attrs + block.count_attrs:
            set_attr(model, ref, len(kept))
        blocks.append(_resized(block, len(kept)))
    new_spec = dataclasses.replace(spec, blocks=tuple(blocks))
    _check_layer_counts(new_spec)
    if update_config:
        record_layout(model, new_spec)
    return new_spec


def _check_layer_counts(spec: MoEModelSpec) -> None:
    """Blocks of one decoder layer (Ernie-VL's text and vision experts) must keep equal counts: some
    checkpoints store them concatenated, so unequal counts would not load."""
    by_layer: dict[int, set[int]] = {}
    for b in spec.blocks:
        if b.layer_index is not None:
            by_layer.setdefault(b.layer_index, set()).add(b.num_experts)
    uneven = {layer: sorted(c) for layer, c in by_layer.items() if len(c) > 1}
    if uneven:
        raise BadOptionError(f"blocks of one decoder layer must keep the same number of experts; layers {uneven} do not")


@dataclass
class DropExperts(Pass):
    """Drop the lowest-scoring experts of every block, or apply an explicit ``plan``.

    ``ratio``: fraction of each block's experts to drop; ``keep``: experts to keep per block.
    ``allocation``: ``uniform`` (the same count in every block; stock config), ``global`` (the same total,
    ranked across blocks; saved in the per-layer format) or an
    :class:`~moe_fx.plan.eep.EvolutionarySearch` (search for the plan, warm-started from the scores).
    """

    ratio: float | None = None
    keep: int | None = None
    plan: PrunePlan | None = None
    allocation: Any = "uniform"
    name = "drop_experts"

    def make_plan(self, model: nn.Module, state: MoEState) -> PrunePlan:
        """The explicit plan, else one under the budget: from the scores, or found by the search."""
        if self.plan is not None:
            return self.plan
        if isinstance(self.allocation, str):
            return make_plan(state.spec, state.scores.per_block, ratio=self.ratio, keep=self.keep, allocation=self.allocation)
        scores = state.scores.per_block if state.scores is not None else None
        state.search = self.allocation.search(model, state.spec, scores, ratio=self.ratio, keep=self.keep, stats=state.stats)
        return state.search.plan

    def check_model(self, model: nn.Module, spec: MoEModelSpec) -> None:
        """A search's ``refine`` pass (compensation measured inside the search) must run on this model too."""
        refine = getattr(self.allocation, "refine", None)
        if refine is not None:
            refine.check_model(model, spec)

    def check_layerwise(self) -> None:
        if self.plan is None and self.allocation != "uniform":
            raise BadOptionError(f"{self.name}: allocation {self.allocation!r} ranks experts across all layers; "
                                 "streaming (one layer at a time) needs allocation='uniform' or an explicit plan")

    def requires(self, state: MoEState) -> None:
        if self.plan is None and isinstance(self.allocation, str):
            require(state.scores is not None, self.name, "expert scores", "Score(...)")

    def run(self, model: nn.Module, state: MoEState) -> PassResult:
        plan = self.make_plan(model, state)
        before = sum(b.num_experts for b in state.spec.blocks)
        modified = plan.kept_experts != PrunePlan.keep_all(state.spec).kept_experts
        state.spec = drop_experts(model, state.spec, plan, update_config=not state.layout_deferred)
        # record kept ids in terms of the original experts, also after several DropExperts passes
        state.plan = plan if state.plan is None else state.plan.then(plan)
        after = sum(b.num_experts for b in state.spec.blocks)
        return PassResult(model, modified, {"experts_before": before, "experts_after": after})
