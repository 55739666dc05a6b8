"""PruneChannels: remove intermediate channels (neurons) inside the routed experts, physically.

Channel ``j`` of expert ``e`` is a row of its gate and up projections (and their biases) and a column of its
down projection; removing it removes ``parts * H + H`` parameters and the same share of the expert's FLOPs.
The fused ``[E, ...]`` tensors are rebuilt at the block's new width (see :class:`~moe_fx.plan.ChannelPlan`:
experts narrower than the block's width are zero-padded, which changes no output), the experts module's width
attributes are updated, experts left with no channel are dropped with their router rows, and the config is
made to describe the result (:func:`moe_fx.model.layout.record_layout`): one width everywhere is a stock config,
anything else the per-layer format.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from moe_fx.errors import BadOptionError
from moe_fx.model.expert_weights import neuron_tensors, rebuilt
from moe_fx.model.layout import record_layout
from moe_fx.model.spec import MoEModelSpec
from moe_fx.model.tensors import get_tensor, set_attr, set_tensor
from moe_fx.pipeline import MoEState, Pass, PassResult, require
from moe_fx.plan.channel_allocate import CHANNEL_ALLOCATIONS, LAYERWISE_ALLOCATIONS, make_channel_plan
from moe_fx.plan.plans import WIDTH_ALIGN, ChannelPlan
from moe_fx.rewrite.drop_experts import drop_experts


def prune_channels(model: nn.Module, spec: MoEModelSpec, plan: ChannelPlan, *, mask_only: bool = False) -> MoEModelSpec:
    """Keep only the planned channels of every planned block's experts; return the updated spec.

    Every expert must keep at least one channel (drop the others first: :meth:`ChannelPlan.kept_experts`).
    ``mask_only``: zero the removed channels in place and keep every shape (a debugging aid to compare
    against the real removal; such a model is never saved).
    """
    plan.validate(spec)
    blocks = []
    for block in spec.blocks:
        kept = plan.kept_channels.get(block.path)
        if kept is None:
            blocks.append(block)
            continue
        if not all(kept):
            raise BadOptionError(f"{block.path}: experts {[e for e, k in enumerate(kept) if not k]} keep no channel; drop them first")
        width = None if mask_only else plan.width(block)
        tensors, _ = neuron_tensors(model, block.experts)
        with torch.no_grad():
            for nt in tensors:
                set_tensor(model, nt.name, rebuilt(get_tensor(model, nt.name).detach(), nt, kept, width))
        if width is not None:
            for ref in block.experts.width_attrs:
                set_attr(model, ref, width)
            block = dataclasses.replace(block, experts=dataclasses.replace(block.experts, intermediate_size=width))
        blocks.append(block)
    return dataclasses.replace(spec, blocks=tuple(blocks))


def routed_parameters(model: nn.Module, spec: MoEModelSpec) -> int:
    """Parameters of the routed experts' tensors (what channel and expert pruning remove)."""
    return sum(get_tensor(model, n).numel() for b in spec.blocks for n in b.experts.tensors)


@dataclass
class PruneChannels(Pass):
    """Remove ``ratio`` of the routed experts' channels by their scores (``Score`` with a channel method), or
    apply an explicit ``plan``.

    ``allocation``: ``uniform`` | ``layer`` | ``expert`` | ``coverage`` (see
    :mod:`moe_fx.plan.channel_allocate`); ``multiple``: per-expert widths are padded to the block's widest
    rounded up to this; ``align``: the output format's block (fp8-block's 128), which every width of an expert
    wider than it is a multiple of (:func:`~moe_fx.plan.plans.width_step`); ``mask_only``: zero instead of remove
    (debug only, refused by ``save_checkpoint``).
    """

    ratio: float | None = None
    allocation: str = "uniform"
    plan: ChannelPlan | None = None
    multiple: int = 64
    align: int = WIDTH_ALIGN
    mask_only: bool = False
    name = "prune_channels"

    def requires(self, state: MoEState) -> None:
        if self.plan is None:
            require(self.ratio is not None, self.name, "a ratio (fraction of routed-expert channels to remove) or a plan", "PruneChannels(ratio=...)")
            require(state.scores is not None and state.scores.granularity == "channel", self.name, "channel scores",
                    "Score(<channel method>) (fisher, heapr, obs, coverage, activation, weight)")
            if self.allocation not in CHANNEL_ALLOCATIONS:
                raise BadOptionError(f"unknown channel allocation {self.allocation!r}; use one of {sorted(CHANNEL_ALLOCATIONS)}")

    def check_layerwise(self) -> None:
        if self.mask_only or (self.plan is None and self.allocation not in LAYERWISE_ALLOCATIONS):
            raise BadOptionError(f"{self.name}: allocation {self.allocation!r} shares one budget across all layers; streaming "
                                 f"(one layer at a time) takes allocation in {sorted(LAYERWISE_ALLOCATIONS)} or an explicit plan, without mask_only")

    def make_plan(self, state: MoEState) -> ChannelPlan:
        if self.plan is not None:
            return self.plan
        s = state.scores
        return make_channel_plan(state.spec, s.per_block, self.ratio, self.allocation, comparable=s.comparable_across_blocks,
                                 expert_scores=s.per_expert, multiple=self.multiple, align=self.align)

    def run(self, model: nn.Module, state: MoEState) -> PassResult:
        plan = self.make_plan(state)
        plan.validate(state.spec)
        before = routed_parameters(model, state.spec)
        widths = {b.path: [len(k) for k in plan.kept_channels[b.path]] for b in state.spec.blocks if b.path in plan.kept_channels}
        per_channel = {b.path: sum(get_tensor(model, nt.name)[0].numel() for nt in neuron_tensors(model, b.experts)[0]) // b.experts.intermediate_size
                       for b in state.spec.blocks}
        experts = plan.kept_experts(state.spec)
        if any(len(experts.kept_experts[p]) < len(k) for p, k in plan.kept_channels.items()):
            state.spec = drop_experts(model, state.spec, experts, update_config=False)
            state.plan = experts if state.plan is None else state.plan.then(experts)
            plan = ChannelPlan({p: [k for k in kept if k] for p, kept in plan.kept_channels.items()}, plan.multiple)
        state.spec = prune_channels(model, state.spec, plan, mask_only=self.mask_only)
        state.channel_plan = plan
        if self.mask_only:
            state.masked = True
        elif not state.layout_deferred:
            record_layout(model, state.spec)
        after = routed_parameters(model, state.spec)
        padding = 0 if self.mask_only else sum(
            per_channel[b.path] * sum(b.experts.intermediate_size - n for n in widths[b.path] if n) for b in state.spec.blocks if b.path in widths
        )
        return PassResult(model, self.mask_only or after < before, {
            "routed_params_before": before,
            "routed_params_after": after,
            "routed_params_ideal": after - padding,
            "widths": {b.path: b.experts.intermediate_size for b in state.spec.blocks},
            "experts": {b.path: b.num_experts for b in state.spec.blocks},
        })
