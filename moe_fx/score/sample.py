"""The token samples that block-local methods read, checked once: every expert's output on sampled tokens (the
``samples`` observer: NAEE, SHAPE evaluate expert subsets on it) and the experts' input with the block's output
(the ``inputs`` observer: the OBS channel scorer and :class:`~moe_fx.passes.CompensateExperts` refit on it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_fx.calibrate.stats import CalibrationStats
from moe_fx.errors import UnsupportedFamilyError
from moe_fx.model.routing import check_subset_routing, matches_recorded, route
from moe_fx.model.spec import MoEBlockSpec, MoEModelSpec
from moe_fx.score.base import Scorer

SAMPLE_NEEDS = ("sample_logits", "sample_expert_out", "sample_seen", "sample_topk_index", "sample_topk_weight")
"""Statistics of the ``samples`` observer that :func:`routed_sample` reads."""


@dataclass(frozen=True)
class RoutedSample:
    """Sampled tokens of one block: raw router logits ``[N, E]``, every expert's output ``[N, E, H]``, and
    the selection bias ``[E]`` (None when the router has none)."""

    logits: torch.Tensor
    expert_out: torch.Tensor
    bias: torch.Tensor | None


class SubsetScorer(Scorer):
    """Base of the scorers that evaluate expert subsets on the sample (NAEE, SHAPE): they read the ``samples``
    observer and need a routing rule that :mod:`moe_fx.model.routing` simulates over any subset."""

    observers = ("routing", "samples")
    needs = SAMPLE_NEEDS

    def check(self, spec: MoEModelSpec) -> None:
        for block in spec.blocks:
            check_subset_routing(block.router)


def routed_sample(stats: CalibrationStats, block: MoEBlockSpec, evaluated: str) -> RoutedSample:
    """The block's sample, after checking that the spec's routing rule reproduces the routing the model
    applied to it; ``evaluated`` names what the caller evaluates, for the error message."""
    n = min(int(stats.get(block.path, "sample_seen")), stats.get(block.path, "sample_logits").shape[0])
    logits = stats.get(block.path, "sample_logits")[:n]
    bias = stats.get(block.path, "sample_selection_bias") if block.router.selection_bias else None
    index, weight = stats.get(block.path, "sample_topk_index")[:n], stats.get(block.path, "sample_topk_weight")[:n]
    if not matches_recorded(block.router, logits, bias, index, weight):
        raise UnsupportedFamilyError(
            f"{block.path}: the routing rule in the spec does not reproduce this router's choices "
            f"(an extra logit transform?), so {evaluated} cannot be evaluated; use --method reap"
        )
    return RoutedSample(logits, stats.get(block.path, "sample_expert_out")[:n], bias)


INPUT_NEEDS = ("input_hidden", "input_logits", "input_target", "input_topk_index", "input_topk_weight", "input_seen")
"""Statistics of the ``inputs`` observer that :func:`inputs_sample` reads."""


def inputs_sample(stats: CalibrationStats, block: MoEBlockSpec) -> dict[str, torch.Tensor | None]:
    """The ``inputs`` observer's sampled tokens of ``block`` (the filled rows): ``input_hidden``, ``input_logits``,
    ``input_target``, ``input_topk_index``/``input_topk_weight`` as the model routed them, and ``bias`` (the
    selection bias, None when the router has none)."""
    acc = stats.per_block[block.path]
    n = min(int(acc["input_seen"]), acc["input_hidden"].shape[0])
    out = {k: acc[k][:n] for k in INPUT_NEEDS if k != "input_seen"}
    out["bias"] = acc["input_selection_bias"] if block.router.selection_bias else None
    return out


def rerouted(block: MoEBlockSpec, sample: dict, kept: torch.Tensor | None, evaluated: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ``(index, weight)`` of the sampled tokens among the ``kept`` experts (positions among the recorded ones;
    None: all), after checking that the spec's routing rule reproduces what the model applied; ``evaluated``
    names what needs it, for the error message."""
    logits, bias = sample["input_logits"], sample["bias"]
    if not matches_recorded(block.router, logits, bias, sample["input_topk_index"], sample["input_topk_weight"]):
        raise UnsupportedFamilyError(
            f"{block.path}: the routing rule in the spec does not reproduce this router's choices (an extra logit "
            f"transform?), so the routing after a drop cannot be simulated; run without {evaluated}"
        )
    return route(block.router, logits, bias, kept)


def routes_by_expert(idx: torch.Tensor, num_experts: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per expert reached by a route of ``idx [n, k]``, its routes' ``(token, slot)`` in row-major order (as
    ``(idx == e).nonzero`` gives them), from one stable sort and one copy to the host instead of a synchronising
    ``nonzero`` per expert."""
    k = idx.shape[1]
    order = torch.sort(idx.flatten(), stable=True).indices
    counts = torch.bincount(idx.flatten(), minlength=num_experts)[:num_experts].tolist()
    out, start = {}, 0
    for e, c in enumerate(counts):
        if c:  # an expert no sampled route reaches is left out
            flat = order[start : start + c]
            out[e] = (flat // k, flat % k)
        start += c
    return out
