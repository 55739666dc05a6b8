"""VirtualPrunePass: evaluate a prune plan inside the graph, on the unpruned checkpoint.

Dropping expert ``e`` is routing as if its router row were gone: its logit is masked to ``-inf`` right after
the router projection (softmax gives it 0, sigmoid gives it 0, a top-k never picks it), and so is its selection
bias (DeepSeek-V3's correction bias), so every later step (group scores, top-k, renormalisation, scaling) sees
the kept experts only, as the physically pruned model does. Removing channel ``j`` of an expert is zeroing its
column of the down projection, which removes its contribution exactly; a masked copy of each down projection is
made once per plan. The logits equal the physically pruned model's (floating-point summation order aside).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import fx, nn

from moe_fx.deliver.graph.match import GraphMoEBlock
from moe_fx.deliver.graph.names import tensor_value
from moe_fx.deliver.graph.pass_base import GraphContext, MoEGraphPass
from moe_fx.deliver.graph.rewrite import add_after, attr_name, constant
from moe_fx.errors import BadOptionError
from moe_fx.model.expert_weights import neuron_tensors, rebuilt
from moe_fx.model.spec import MoEBlockSpec, MoEModelSpec
from moe_fx.model.tensors import get_tensor
from moe_fx.plan.plans import ChannelPlan, PrunePlan


class VirtualPrunePass(MoEGraphPass):
    """Apply ``plan`` (experts kept, original ids) and then ``channels`` (channels kept by each expert of ``plan``'s
    kept experts, as :class:`~moe_fx.rewrite.prune_channels.PruneChannels` takes them) inside the graph."""

    name: ClassVar[str] = "virtual_prune"

    def __init__(self, plan: PrunePlan | None = None, channels: ChannelPlan | None = None) -> None:
        if plan is None and channels is None:
            raise BadOptionError("VirtualPrunePass needs a PrunePlan, a ChannelPlan or both")
        self.plan, self.channels = plan, channels
        self._masked_down: dict[str, torch.Tensor] = {}

    def check(self, model: nn.Module | None, spec: MoEModelSpec | None) -> None:
        super().check(model, spec)
        if self.plan is not None:
            self.plan.validate(spec)
        if self.channels is not None:
            self.channels.validate(_after_plan(spec, self.plan))

    def kept(self, block: MoEBlockSpec) -> tuple[list[int], list[list[int]] | None]:
        """Original ids of the experts kept after both plans, and the channels each keeps (None: all)."""
        kept = list(self.plan.kept_experts.get(block.path, range(block.num_experts))) if self.plan else list(range(block.num_experts))
        if self.channels is None or block.path not in self.channels.kept_channels:
            return kept, None
        per_expert = self.channels.kept_channels[block.path]
        return [kept[j] for j, ch in enumerate(per_expert) if ch], [ch for ch in per_expert if ch]

    def rewrite(self, gm: fx.GraphModule, block: GraphMoEBlock, ctx: GraphContext) -> bool:
        spec = block.spec
        kept, channels = self.kept(spec)
        changed = False
        if len(kept) < spec.num_experts:
            self._mask_experts(gm, block, kept)
            changed = True
        if channels is not None:
            self._mask_channels(gm, block, ctx.model, kept, channels)
            changed = True
        return changed

    def _mask_experts(self, gm: fx.GraphModule, block: GraphMoEBlock, kept: list[int]) -> None:
        targets = [block.logits]
        selection = block.spec.router.selection_bias
        if selection and selection in block.tensors:
            targets.append(block.tensors[selection])
        for i, node in enumerate(targets):
            value = tensor_value(node)
            mask = torch.full((block.num_experts,), float("-inf"), dtype=value.dtype, device=value.device)
            mask[kept] = 0
            add_after(gm, node, constant(gm, attr_name(block, f"expert_mask_{i}"), mask, before=min(node.users, key=_order(gm))))

    def _mask_channels(self, gm: fx.GraphModule, block: GraphMoEBlock, model: nn.Module, kept: list[int], channels: list[list[int]]) -> None:
        spec = block.spec.experts
        node = block.tensors[spec.down]
        if block.path not in self._masked_down:
            nt = next(t for t in neuron_tensors(model, spec)[0] if t.name == spec.down)
            per_expert: list[list[int]] = [[] for _ in range(block.num_experts)]  # dropped experts: all zero
            for e, ids in zip(kept, channels):
                per_expert[e] = ids
            self._masked_down[block.path] = rebuilt(get_tensor(model, spec.down).detach(), nt, per_expert, None)
        masked = constant(gm, attr_name(block, "masked_down"), self._masked_down[block.path], before=min(node.users, key=_order(gm)), stands_for=spec.down)
        node.replace_all_uses_with(masked)


def _order(gm: fx.GraphModule):
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return order.get


def _after_plan(spec: MoEModelSpec, plan: PrunePlan | None) -> MoEModelSpec:
    """``spec`` with each block's expert count after ``plan`` (what a channel plan over the kept experts indexes)."""
    if plan is None:
        return spec
    blocks = []
    for b in spec.blocks:
        n = len(plan.kept_experts.get(b.path, range(b.num_experts)))
        blocks.append(dataclasses.replace(b, experts=dataclasses.replace(b.experts, num_experts=n)))
    return dataclasses.replace(spec, blocks=tuple(blocks))
