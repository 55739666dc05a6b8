"""Instrument router and experts calls of every MoE block, and always restore the model afterwards.

The experts module is the one place every family routes through with the *final* routing decision
(after group limits, correction biases, renormalisation and scaling): ``experts(h, top_k_index,
top_k_weights)``. When an observer needs per-expert outputs, the instrumented call runs the family's own
experts implementation once with every (token, slot) pair as its own top-1 route and weight 1, which
yields the unweighted output of each routed expert at the cost of the original call, then combines them
with the routing weights exactly as the stock implementations do. No expert math is re-implemented.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moe_fx.calibrate.observers import Observer, RoutingEvent
from moe_fx.errors import UnsupportedFamilyError
from moe_fx.model.expert_math import ExpertMath
from moe_fx.model.routing import route
from moe_fx.model.spec import MoEBlockSpec, MoEModelSpec
from moe_fx.model.tensors import get_tensor

_INDEX_KW = ("top_k_index", "router_indices", "selected_experts")
_WEIGHT_KW = ("top_k_weights", "routing_weights", "router_scores")


def router_logits(model: nn.Module, block: MoEBlockSpec, hidden: torch.Tensor) -> torch.Tensor:
    """Raw router logits ``[T, E]`` (router bias included) for the router input ``hidden [..., H]``."""
    weight = get_tensor(model, block.router.weight)
    bias = get_tensor(model, block.router.bias) if block.router.bias else None
    return F.linear(hidden.reshape(-1, weight.shape[1]).float(), weight.float(), None if bias is None else bias.float())


def router_probs(block: MoEBlockSpec, logits: torch.Tensor) -> torch.Tensor:
    """Router probabilities over all experts: softmax or sigmoid of the logits, per the spec."""
    return torch.sigmoid(logits) if block.router.score_fn.startswith("sigmoid") else torch.softmax(logits, dim=-1)


def routing_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden, top_k_index, top_k_weights)`` of a routed experts call, positional or by any family's keyword."""
    hidden = args[0] if args else kwargs["hidden_states"]
    rest = list(args[1:])
    idx = rest.pop(0) if rest else next(kwargs[k] for k in _INDEX_KW if k in kwargs)
    w = rest.pop(0) if rest else next(kwargs[k] for k in _WEIGHT_KW if k in kwargs)
    return hidden, idx, w


def _per_slot_outputs(forward, hidden: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Unweighted output of the routed expert for every (token, slot): ``[T*k, H]``."""
    k = idx.shape[-1]
    flat_hidden = hidden.repeat_interleave(k, dim=0)
    flat_idx = idx.reshape(-1, 1)
    ones = torch.ones(flat_idx.shape, dtype=hidden.dtype, device=hidden.device)
    return forward(flat_hidden, flat_idx, ones)


class BlockProbe:
    """Holds one block's observers and accumulators and the router logits of the current call.

    :meth:`observe` is the instrumented experts call, shared by the eager hooks (:func:`instrument`) and the
    compiled instrumentation pass (:mod:`moe_fx.deliver.graph.instrument`), which passes its own accumulators."""

    def __init__(self, model: nn.Module, block: MoEBlockSpec, observers: Sequence[Observer]) -> None:
        self.model, self.block, self.observers = model, block, observers
        # accumulators live beside the block's experts (a streaming run holds one layer on the GPU, the rest on meta)
        device = get_tensor(model, block.experts.down).device
        self.acc: dict[str, torch.Tensor] = {}
        for o in observers:
            self.acc.update(o.init(block, device))
        self.needs_outputs = any(o.needs_outputs for o in observers)
        self.needs_probs = any(o.needs_probs for o in observers)
        self.prescaled = block.experts.call_style == "dense_prescaled"
        # a prescaled call carries no routing: it is re-derived from the router's input and logits
        self.needs_logits = self.prescaled or self.needs_probs or any(o.needs_logits for o in observers)
        self.pending_hidden: torch.Tensor | None = None
        self.grad_observers = [o for o in observers if o.needs_grads]
        self.math = ExpertMath(model, block.experts) if any(o.needs_math for o in observers) else None
        selection = block.router.selection_bias
        self.selection_bias = get_tensor(model, selection).detach().reshape(-1).float() if selection else None
        self.pending_logits: torch.Tensor | None = None

    def router_pre_hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.pending_logits = router_logits(self.model, self.block, hidden.detach())
        if self.prescaled:
            self.pending_hidden = hidden.detach().reshape(-1, hidden.shape[-1])

    def wrap(self, forward):
        if self.prescaled:
            def prescaled(routed_in, *args, **kwargs):
                out = self.observe_prescaled(lambda h: forward(h, *args, **kwargs), routed_in)
                self.pending_logits = self.pending_hidden = None
                return out

            return prescaled

        def instrumented(*args, **kwargs):
            hidden, idx, w = routing_args(args, kwargs)
            out = self.observe(self.acc, forward, hidden, idx, w, self.pending_logits, lambda: forward(*args, **kwargs))
            self.pending_logits = None
            return out

        return instrumented

    def observe(self, acc: dict[str, torch.Tensor], forward, hidden: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                logits: torch.Tensor | None, call) -> torch.Tensor:
        """The experts output for ``(hidden, idx, w)``, with every observer updated in ``acc``. ``forward``: the
        experts forward (run per slot when observers need expert outputs); ``call()``: the original call."""
        # with gradient observers the output stays differentiable, so the loss gradient reaches earlier layers
        with torch.set_grad_enabled(bool(self.grad_observers) and torch.is_grad_enabled()):
            if self.needs_outputs:
                y = _per_slot_outputs(forward, hidden, idx)
                t, k = idx.shape
                out = (y.view(t, k, -1) * w.unsqueeze(-1)).sum(dim=1).to(hidden.dtype)
            else:
                y, out = None, call()
        event = self._update(acc, hidden, idx, w, y, logits, lambda h, i: _per_slot_outputs(forward, h, i))
        if self.grad_observers and out.requires_grad:
            out.register_hook(lambda grad: self._on_grad(event, grad))
        return out

    @torch.no_grad()
    def observe_prescaled(self, forward, routed_in: torch.Tensor) -> torch.Tensor:
        """The ``dense_prescaled`` call (Llama 4): ``experts(h * score_e, stacked over experts [E * T, H])``, the score
        0 where a token is not routed. Its output already holds each expert's product for each token (row ``e * T +
        t``), so nothing runs twice: the routing comes from the router's logits by the spec's rule, and the observers
        get ``y = contribution / w`` (the weight scales the expert's *input*, so ``sum_slots w * y`` is still the
        block's routed output, and REAP's ``w * ||y||`` the norm of what the expert adds)."""
        hidden, logits = self.pending_hidden, self.pending_logits
        idx, w = route(self.block.router, logits, self.selection_bias)
        out = forward(routed_in)
        t = hidden.shape[0]
        contribution = out.view(self.block.num_experts, t, -1)[idx, torch.arange(t, device=idx.device)[:, None]]
        w = w.to(out.dtype)
        y = (contribution / w.unsqueeze(-1).clamp(min=torch.finfo(out.dtype).tiny)).reshape(t * idx.shape[1], -1)
        self._update(self.acc, hidden, idx, w, y, logits, None)
        return out

    @torch.no_grad()
    def _update(self, acc, hidden, idx, w, y, logits, run_experts) -> RoutingEvent:
        event = RoutingEvent(
            hidden.detach(), idx, w.detach(), None if y is None else y.detach(),
            router_probs=router_probs(self.block, logits) if self.needs_probs else None,
            router_logits=logits,
            selection_bias=self.selection_bias,
            run_experts=run_experts,
            expert_math=self.math,
        )
        for o in self.observers:
            o.update(acc, event)
        return event

    def _on_grad(self, event: RoutingEvent, grad: torch.Tensor) -> None:
        with torch.no_grad():
            for o in self.grad_observers:
                o.update_grads(self.acc, event, grad.detach())


def check_routed(spec: MoEModelSpec) -> None:
    """Refuse blocks whose experts call is not ``experts(h, top_k_index, top_k_weights)`` (what the compiled
    instrumentation rewrites)."""
    for block in spec.blocks:
        if block.experts.call_style != "routed":
            raise UnsupportedFamilyError(
                f"{block.path}: compiled calibration of {block.experts.call_style!r} experts calls is not implemented; calibrate eagerly"
            )


def check_observable(spec: MoEModelSpec, observers: Sequence[Observer]) -> None:
    """Refuse observers a block's experts call cannot feed: a ``dense_prescaled`` call (Llama 4) scales each
    expert's input by its weight, so observers of the experts' intermediate activations, of gradients, or of
    experts on routes not taken, which assume the weight outside the expert, are refused there."""
    inside = [o.name for o in observers if o.needs_math or o.needs_grads or o.needs_other_routes]
    for block in spec.blocks:
        if block.experts.call_style == "dense_prescaled" and inside:
            raise UnsupportedFamilyError(
                f"{block.path}: its experts scale their input by the routing weight (Llama 4), which the {', '.join(inside)} "
                "statistics do not model; use --method reap, frequency or eep"
            )


@contextlib.contextmanager
def instrument(model: nn.Module, spec: MoEModelSpec, observers: Sequence[Observer]) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
    """Attach observers to every block; yield ``{block_path: accumulators}``; restore the model on exit."""
    check_observable(spec, observers)
    probes = {b.path: BlockProbe(model, b, observers) for b in spec.blocks}
    handles, patched = [], []
    try:
        for probe in probes.values():
            if probe.needs_logits:
                router = model.get_submodule(probe.block.router.path)
                handles.append(router.register_forward_pre_hook(probe.router_pre_hook, with_kwargs=True))
            experts = model.get_submodule(probe.block.experts.path)
            patched.append((experts, experts.__dict__.get("forward")))
            experts.forward = probe.wrap(experts.forward)
        yield {path: probe.acc for path, probe in probes.items()}
    finally:
        for h in handles:
            h.remove()
        for experts, own_forward in patched:
            if own_forward is None:
                experts.__dict__.pop("forward", None)
            else:
                experts.forward = own_forward
