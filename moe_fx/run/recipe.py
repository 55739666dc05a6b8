"""A method name and a budget -> the passes that prune with it, and the calibration observers they need:
what ``moe-fx prune`` and ``moe-fx sweep`` both build, so a sweep point is exactly the prune it stands for."""

from __future__ import annotations

from collections.abc import Iterable

from moe_fx.model.spec import MoEModelSpec
from moe_fx.passes import Calibrate, CompensateExperts, DropExperts, MergeExperts, PruneChannels, Score, SubstituteExperts
from moe_fx.pipeline import Pass
from moe_fx.plan.allocate import experts_to_keep
from moe_fx.plan.plans import WIDTH_ALIGN
from moe_fx.score import Scorer

SUBSTITUTE = "substitute"
"""The rewrite of :func:`parse_method` that replaces pruned experts by constants (:class:`SubstituteExperts`)."""

REWRITING_METHODS = {"ream": ("reap", "ream"), "mone": ("mone", SUBSTITUTE)}
"""Methods that are a scorer plus a rewrite other than dropping: REAM groups REAP's dropped experts (a
:class:`MergeExperts` grouping); MoNE replaces the experts of least substitution error by constants."""


def parse_method(name: str) -> tuple[str, str | None]:
    """A method name -> (scorer name, rewrite: a merge grouping, ``substitute`` or None to drop): ``merge-reap`` ->
    (``reap``, ``nearest``), ``ream`` -> (``reap``, ``ream``), ``mone`` -> (``mone``, ``substitute``), ``reap`` ->
    (``reap``, None)."""
    if name in REWRITING_METHODS:
        return REWRITING_METHODS[name]
    return (name.removeprefix("merge-"), "nearest") if name.startswith("merge-") else (name, None)


def observers_for(scorers: Iterable[Scorer], *, merge: str | None = None, compensate: bool = False) -> tuple[str, ...]:
    """Calibrate observers recording what the scorers, merging (``merge``: a :class:`MergeExperts` grouping, which reads
    ``samples``), substitution (``merge="substitute"``: ``inputs``) and compensation (``inputs``) read."""
    needed = list(Calibrate.observers)
    for s in scorers:
        needed += s.observers
    needed += (["inputs"] if merge == SUBSTITUTE else ["samples"] if merge else []) + (["inputs"] if compensate else [])
    return tuple(dict.fromkeys(needed))


def prune_passes(
    scorer: Scorer,
    spec: MoEModelSpec,
    *,
    ratio: float | None = None,
    keep: int | None = None,
    merge: str | None = None,
    compensate: bool = False,
    allocation="uniform",
    multiple: int = 64,
    align: int = WIDTH_ALIGN,
    seed: int = 0,
    ridge: float = 1.0,
) -> list[Pass]:
    """Score, the rewrite of the scorer's granularity (drop or merge experts, or prune channels), then optional
    compensation. ``merge``: None (drop), a :class:`MergeExperts` grouping (``nearest``, ``ream``) or ``substitute``;
    ``allocation``: a name, or an allocation object such as an EEP search; ``multiple``, ``align``: :class:`PruneChannels`'."""
    if scorer.granularity == "channel":
        passes: list[Pass] = [Score(scorer.name, seed=seed), PruneChannels(ratio=ratio, allocation=allocation, multiple=multiple, align=align)]
    else:
        options = None
        if scorer.name == "naee" and allocation == "uniform" and len({b.num_experts for b in spec.blocks}) == 1:
            options = {"keep": experts_to_keep(spec.blocks[0].num_experts, ratio, keep)}  # exhaustive when small
        if merge == SUBSTITUTE:  # compensation is the substitution's own refit (no pass may follow it)
            rewrite: Pass = SubstituteExperts(ratio=ratio, keep=keep, allocation=allocation, refit=compensate, ridge=ridge)
            compensate = False
        elif merge:
            rewrite = MergeExperts(ratio=ratio, keep=keep, allocation=allocation, grouping=merge)
        else:
            rewrite = DropExperts(ratio=ratio, keep=keep, allocation=allocation)
        passes = [Score(scorer.name, seed=seed, options=options), rewrite]
    if compensate:
        passes.append(CompensateExperts(ridge=ridge))
    return passes


def split_passes(
    expert_scorer: Scorer | None, channel_scorer: Scorer, spec: MoEModelSpec, *, expert_ratio: float | None, channel_ratio: float,
    allocation="uniform", multiple: int = 64, align: int = WIDTH_ALIGN, **common,
) -> list[Pass]:
    """Drop ``expert_ratio`` of each block's experts (scored by ``expert_scorer``), then remove ``channel_ratio`` of the
    kept experts' channels (``channel_scorer``, ``allocation``, ``multiple``, ``align``), then optional compensation; ``common``:
    :func:`prune_passes`' ``compensate``, ``seed`` and ``ridge``. Either ratio may be 0 or None: that rewrite is left
    out (experts alone take ``expert_scorer`` with uniform counts)."""
    if not channel_ratio:
        return prune_passes(expert_scorer, spec, ratio=expert_ratio, **common)
    head: list[Pass] = [Score(expert_scorer.name, seed=common.get("seed", 0)), DropExperts(ratio=expert_ratio)] if expert_ratio else []
    return head + prune_passes(channel_scorer, spec, ratio=channel_ratio, allocation=allocation, multiple=multiple, align=align, **common)


def split_label(split: tuple[float, float]) -> str:
    """How a split of a parameter budget is named in output and records: ``experts 0.125, channels 0.1429``."""
    return f"experts {split[0]:.4g}, channels {split[1]:.4g}"


def bucket_candidates(ratio: float, streamed: bool) -> dict[str, str]:
    """``--preset best-oneshot-params``' candidates that spend the budget ``ratio`` on channels with per-expert widths
    in width buckets, by name, with their allocation: the model's global ranking and each layer's own budget in memory
    (each was the better one at one budget on qwen3moe-bench), each layer's own when streamed (one layer at a time)."""
    label = f"{split_label((0.0, ratio))}, widths in buckets"
    per_layer = {f"{label} per layer": "buckets-per-layer"}
    return per_layer if streamed else {label: "buckets", **per_layer}
