"""Observers: what each scoring method needs, accumulated as running sums per MoE block.

An observer declares what it needs from a routing event (the router's full probabilities, the per-slot
expert outputs) and updates its named accumulators. Later methods add observers (channel activations,
gradients, coalitions) without touching the instrumentation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...spec import MoEBlockSpec


@dataclass
class RoutingEvent:
    """One experts call: ``hidden [T,H]``, ``top_k_index/weights [T,k]``, and optional extras."""

    hidden: torch.Tensor
    top_k_index: torch.Tensor
    top_k_weights: torch.Tensor
    expert_out: torch.Tensor | None = None
    """Unweighted output of the routed expert for each (token, slot): ``[T*k, H]``."""
    router_probs: torch.Tensor | None = None
    """Router probabilities over all experts ``[T, E]`` (softmax or sigmoid of the logits)."""


class Observer:
    """Base observer: ``init`` makes zeroed accumulators, ``update`` adds one event."""

    name = "observer"
    needs_outputs = False
    needs_probs = False

    def init(self, block: MoEBlockSpec, device: torch.device) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def update(self, acc: dict[str, torch.Tensor], event: RoutingEvent) -> None:
        raise NotImplementedError


def _scatter(acc: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
    acc.index_add_(0, idx.reshape(-1), values.reshape(-1).to(acc.dtype))


class RoutingObserver(Observer):
    """Per expert: routed token count, sum of applied routing weights, router probability mass."""

    name = "routing"
    needs_probs = True

    def init(self, block, device):
        z = lambda: torch.zeros(block.num_experts, dtype=torch.float64, device=device)  # noqa: E731
        return {"count": z(), "weight_sum": z(), "prob_mass": z(), "tokens": torch.zeros((), dtype=torch.float64, device=device)}

    def update(self, acc, event):
        idx = event.top_k_index
        _scatter(acc["count"], idx, torch.ones_like(idx, dtype=torch.float64))
        _scatter(acc["weight_sum"], idx, event.top_k_weights.detach().double())
        if event.router_probs is not None:
            acc["prob_mass"] += event.router_probs.detach().double().sum(0)
        acc["tokens"] += idx.shape[0]


class ReapObserver(Observer):
    """Per expert: sum over routed tokens of ``w * ||expert output||_2`` (REAP saliency) and of ``||output||``."""

    name = "reap"
    needs_outputs = True

    def init(self, block, device):
        z = lambda: torch.zeros(block.num_experts, dtype=torch.float64, device=device)  # noqa: E731
        return {"reap_sum": z(), "out_norm_sum": z()}

    def update(self, acc, event):
        norms = event.expert_out.detach().float().norm(dim=-1).double()  # [T*k]
        _scatter(acc["reap_sum"], event.top_k_index, norms * event.top_k_weights.detach().reshape(-1).double())
        _scatter(acc["out_norm_sum"], event.top_k_index, norms)


OBSERVERS: dict[str, type[Observer]] = {o.name: o for o in (RoutingObserver, ReapObserver)}
