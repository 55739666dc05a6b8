"""A method name and a budget -> the passes that prune with it, and the calibration observers they need:
what ``moe-fx prune`` and ``moe-fx sweep`` both build, so a sweep point is exactly the prune it stands for."""

from __future__ import annotations

from collections.abc import Iterable

from moe_fx.model.spec import MoEModelSpec
from moe_fx.passes import Calibrate, CompensateExperts, DropExperts, MergeExperts, PruneChannels, Score
from moe_fx.pipeline import Pass
from moe_fx.plan.allocate import experts_to_keep
from moe_fx.score import Scorer


def parse_method(name: str) -> tuple[str, bool]:
    """``merge-reap`` -> (``reap``, merge); ``reap`` -> (``reap``, no merge)."""
    return (name.removeprefix("merge-"), True) if name.startswith("merge-") else (name, False)


def observers_for(scorers: Iterable[Scorer], *, merge: bool = False, compensate: bool = False) -> tuple[str, ...]:
    """Calibrate observers recording what the scorers, merging (``samples``) and compensation (``inputs``) read."""
    needed = list(Calibrate.observers)
    for s in scorers:
        needed += s.observers
    needed += (["samples"] if merge else []) + (["inputs"] if compensate else [])
    return tuple(dict.fromkeys(needed))


def prune_passes(
    scorer: Scorer,
    spec: MoEModelSpec,
    *,
    ratio: float | None = None,
    keep: int | None = None,
    merge: bool = False,
    compensate: bool = False,
    allocation="uniform",
    multiple: int = 64,
    seed: int = 0,
    ridge: float = 1.0,
) -> list[Pass]:
    """Score, the rewrite of the scorer's granularity (drop or merge experts, or prune channels), then optional
    compensation. ``allocation``: a name, or an allocation object such as an EEP search."""
    if scorer.granularity == "channel":
        passes: list[Pass] = [Score(scorer.name, seed=seed), PruneChannels(ratio=ratio, allocation=allocation, multiple=multiple)]
    else:
        options = None
        if scorer.name == "naee" and allocation == "uniform" and len({b.num_experts for b in spec.blocks}) == 1:
            options = {"keep": experts_to_keep(spec.blocks[0].num_experts, ratio, keep)}  # exhaustive when small
        rewrite = MergeExperts if merge else DropExperts
        passes = [Score(scorer.name, seed=seed, options=options), rewrite(ratio=ratio, keep=keep, allocation=allocation)]
    if compensate:
        passes.append(CompensateExperts(ridge=ridge))
    return passes
