"""SubstituteExperts: MoNE's expert substitution (arXiv 2507.00390) - each pruned expert becomes a constant vector.

Dropping an expert removes its router row, so its tokens re-route to their next-best kept expert. MoNE keeps the
router whole and replaces the pruned expert by a "novice": its routing-weighted mean output on the calibration
sample (:func:`~moe_fx.score.novice.novice_fit`), so a token routed to it gets ``weight * constant``. The experts
to replace follow the plan (by default from the ``mone`` scorer's substitution error; any expert scores work).

How the constant is stored depends on the family:

- *Folded* where the experts have a down-projection bias and a gating that maps zero to zero (GPT-OSS): the
  substituted expert's weights and up bias become zero and its down bias the constant, so it outputs exactly the
  constant in the stock format (no remote code). Width buckets then store it one neuron wide (``expert_storage``
  ``auto``, :mod:`moe_fx.formats.ragged`).
- Elsewhere the experts module keeps only the kept experts and becomes a
  :class:`~moe_fx.model.per_layer.NoviceExperts` (router expert -> held slot or constant); the config records it
  (``novices`` in ``moe_fx_layout``), so ``moe_fx.load`` and ``from_pretrained(..., trust_remote_code=True)`` load
  it. Such a model is final: no pass runs after this one, and ``trace`` refuses it (nothing else rewrites a router
  that routes to more experts than its module holds).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from moe_fx.errors import BadOptionError, UnsupportedFamilyError
from moe_fx.kernels import experts_module
from moe_fx.model.expert_math import check_expert_math
from moe_fx.model.expert_weights import neuron_tensors
from moe_fx.model.layout import record_layout
from moe_fx.model.per_layer import make_novices
from moe_fx.model.routing import check_group_simulation
from moe_fx.model.spec import MoEBlockSpec, MoEModelSpec
from moe_fx.model.tensors import get_tensor, set_attr, set_tensor
from moe_fx.pipeline import MoEState, PassResult, require
from moe_fx.plan.plans import PrunePlan
from moe_fx.rewrite.compensate import compensate_block
from moe_fx.rewrite.drop_experts import DropExperts, _resized
from moe_fx.score.novice import novice_fit
from moe_fx.score.sample import INPUT_NEEDS, inputs_sample


def fold_target(model: nn.Module, block: MoEBlockSpec) -> str | None:
    """The down-projection bias a constant can be folded into (zero weights -> the expert outputs its down bias), or
    None where the family has none, or where zero weights would not give a zero activation or an output norm follows."""
    experts = model.get_submodule(block.experts.path)
    if block.experts.call_style != "routed" or getattr(experts, "has_post_expert_norm", False):
        return None
    _, passive = neuron_tensors(model, block.experts)
    if len(passive) != 1:
        return None
    up = get_tensor(model, block.experts.gate_up or block.experts.up)
    parts = 2 if block.experts.gate_up else 1
    return passive[0] if experts_module.zero_maps_to_zero(experts, parts, block.experts.intermediate_size, up) else None


@torch.no_grad()
def fold_novices(model: nn.Module, block: MoEBlockSpec, substituted: list[int], constants: torch.Tensor, bias: str) -> None:
    """Zero the ``substituted`` experts' neuron tensors (weights, up bias) and set their down ``bias`` to the constants."""
    tensors, _ = neuron_tensors(model, block.experts)
    ids = torch.tensor(substituted, dtype=torch.long)
    for t in [get_tensor(model, nt.name) for nt in tensors]:
        t[ids.to(t.device)] = 0
    b = get_tensor(model, bias)
    b[ids.to(b.device)] = constants[ids].to(b)


@torch.no_grad()
def hold_novices(model: nn.Module, block: MoEBlockSpec, kept: list[int], constants: torch.Tensor) -> MoEBlockSpec:
    """Keep only the ``kept`` experts in the experts module (router untouched) and make it a ``NoviceExperts`` holding
    the other experts' constants; returns the block's spec with the held count."""
    module = model.get_submodule(block.experts.path)
    idx = torch.tensor(kept, dtype=torch.long)
    for name in block.experts.tensors:
        t = get_tensor(model, name)
        set_tensor(model, name, t.detach().index_select(0, idx.to(t.device)).clone())
    for ref in block.count_attrs:
        if ref.partition(":")[0] == block.experts.path:
            set_attr(model, ref, len(kept))
    make_novices(module, block.num_experts, block.experts.hidden_size)
    slot = torch.full((block.num_experts,), -1, dtype=torch.long)
    slot[idx] = torch.arange(len(kept))
    novices = constants.clone()
    novices[idx] = 0
    module.novice_slot.copy_(slot)
    module.novices.copy_(novices)
    return _resized(block, len(kept))


@dataclass
class SubstituteExperts(DropExperts):
    """Replace the experts the plan drops by constant novices (see module doc); options as :class:`DropExperts`, and
    ``refit`` (with ``ridge`` and ``sweeps``, as :class:`~moe_fx.passes.CompensateExperts`).

    Needs the ``inputs`` observer's statistics of the unpruned model (``Calibrate(observers=('routing',
    'inputs'))``), and runs first among the expert rewrites: the constants are fitted on the experts the
    sample saw. Experts called the ``routed`` way only (not Llama 4's pre-scaled inputs, where the weight scales the
    expert's input and a constant cannot stand in).
    """

    refit: bool = False
    """Refit the kept experts' down projections and the constants to the block's original output on the sample
    (:func:`~moe_fx.rewrite.compensate.compensate_block` with the routing kept; ``--compensate``)."""
    ridge: float = 1.0
    sweeps: int = 2
    name = "substitute_experts"

    def check_model(self, model: nn.Module, spec: MoEModelSpec) -> None:
        super().check_model(model, spec)
        for block in spec.blocks:
            if block.experts.call_style != "routed":
                raise UnsupportedFamilyError(f"{block.path}: {type(model.get_submodule(block.experts.path)).__name__} scales each expert's "
                                             "input by its routing weight, so a constant cannot stand in for an expert; use --method reap")
            check_expert_math(model.get_submodule(block.experts.path), block.experts, linear_down=self.refit)
            if self.refit:
                check_group_simulation(block.router)

    def requires(self, state: MoEState) -> None:
        super().requires(state)
        require(state.stats is not None, self.name, "calibration statistics (the inputs observer)", "Calibrate(...)")
        missing = [(b.path, k) for b in state.spec.blocks for k in INPUT_NEEDS if k not in state.stats.per_block.get(b.path, {})]
        require(not missing, self.name, f"the {missing[0][1] if missing else ''!r} statistic (missing for {missing[0][0] if missing else ''})",
                "Calibrate(observers=('routing', 'inputs'))")
        if state.plan is not None:
            raise BadOptionError(f"{self.name}: experts were dropped before it; substitute experts first, on statistics of the unpruned model")

    def run(self, model: nn.Module, state: MoEState) -> PassResult:
        plan = self.make_plan(model, state)
        plan.validate(state.spec)
        blocks, folded, substituted, held_plan, refits = [], [], {}, {}, {}
        for block in state.spec.blocks:
            kept = plan.kept_experts.get(block.path)
            if kept is None or len(kept) == block.num_experts:
                blocks.append(block)
                continue
            constants, _ = novice_fit(model, state.stats, block)
            dropped = sorted(set(range(block.num_experts)) - set(kept))
            substituted[block.path] = dropped
            if self.refit:
                device = get_tensor(model, block.experts.down).device
                refit = {e: constants[e].to(device) for e in dropped}
                refits[block.path] = compensate_block(model, block, inputs_sample(state.stats, block), None, ridge=self.ridge,
                                                      sweeps=self.sweeps, constants=refit)
                constants[dropped] = torch.stack([refit[e].cpu() for e in dropped])
            bias = fold_target(model, block)
            if bias is not None:
                fold_novices(model, block, dropped, constants, bias)
                folded.append(block.path)
                blocks.append(block)
            else:
                blocks.append(hold_novices(model, block, kept, constants))
                held_plan[block.path] = kept
        state.spec = dataclasses.replace(state.spec, blocks=tuple(blocks))
        if not state.layout_deferred:
            record_layout(model, state.spec)
        if held_plan:  # the plan says which experts a module holds: folded blocks hold all of theirs
            state.plan, state.substituted = PrunePlan(held_plan), True
        return PassResult(model, bool(substituted), {
            "substituted": sum(len(d) for d in substituted.values()), "folded_blocks": len(folded), "novice_blocks": len(held_plan),
            "substituted_experts": substituted, "refit": refits or None})
