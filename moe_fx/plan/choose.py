"""ChooseRecipe: run candidate rewrites on throw-away views of the model and keep the one whose pruned model predicts
held-out calibration tokens best.

Why: what a budget should remove depends on the model, and block-local errors do not tell. Removing 25% of the routed
parameters, whole experts were best on a Mixtral (0.79x REAP's loss against 1.25x as channels) and channels on a
Qwen2-MoE (0.30x against 0.44x), while compensation's block error ranked channels first on both
(``docs/benchmarks/quality.md``). The end-to-end next-token NLL on calibration windows the scorers never saw ranks them
as the held-out text does, as EEP's fitness does for expert plans (:mod:`moe_fx.plan.eep`).

How: each candidate (a list of passes, e.g. Score -> DropExperts -> Score -> PruneChannels -> CompensateExperts) runs
on a *shallow* copy of the model that shares every tensor with it and a copy of its state (the calibration statistics
shared, read only), so it allocates only the tensors its rewrites replace; its fitness is the mean NLL over the
fitness windows. The best candidate's passes then run once more on the model itself (they are deterministic: the same
weights the fitness measured, which the report records), so memory is the model plus one candidate's rewritten experts.

Cost: every candidate's rewrite once, the winner's twice, and one forward over the fitness tokens per candidate. This
runs on a model in memory; :func:`~moe_fx.run.streaming.stream_prune` streams each candidate to its own output and
measures that instead (:mod:`moe_fx.run.stream_choose`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from moe_fx.calibrate.data import calibration_tokens
from moe_fx.errors import BadOptionError
from moe_fx.evaluate.nll import nll_sum
from moe_fx.model.mode import eval_mode
from moe_fx.model.spec import MoEModelSpec
from moe_fx.pipeline import STATE_ATTR, MoEState, Pass, PassResult, compose
from moe_fx.plan.eep import shared_view
from moe_fx.progress import progress_bar

__all__ = ["ChooseRecipe"]


@dataclass
class ChooseRecipe(Pass):
    """Keep the candidate rewrite with the lowest NLL on held-out calibration windows (see module doc).

    ``candidates``: label -> the passes of one recipe, run after calibration (they read its statistics);
    ``data``: fitness tokens held out from calibration (a TokenBatch, a LongTensor ``[N, L]``, texts or a path).
    Ties go to the first candidate.
    """

    candidates: dict[str, tuple[Pass, ...]] = field(default_factory=dict)
    data: Any = None
    tokenizer: Any = None
    seq_len: int = 512
    max_tokens: int = 16384
    batch_size: int = 8
    show_progress: bool = True

    name = "choose_recipe"

    def __post_init__(self) -> None:
        if not self.candidates:
            raise BadOptionError("ChooseRecipe needs at least one candidate recipe (label -> passes)")
        if self.data is None:
            raise BadOptionError("ChooseRecipe needs data: fitness tokens held out from the calibration data")
        for label, passes in self.candidates.items():
            if not passes or not all(isinstance(p, Pass) for p in passes):
                raise BadOptionError(f"ChooseRecipe candidate {label!r}: give a non-empty sequence of moe_fx passes")
        self.candidates = {label: tuple(passes) for label, passes in self.candidates.items()}

    def check_model(self, model: nn.Module, spec: MoEModelSpec) -> None:
        for passes in self.candidates.values():
            for p in passes:
                p.check_model(model, spec)

    def requires(self, state: MoEState) -> None:
        for passes in self.candidates.values():
            passes[0].requires(state)

    def config_dict(self) -> dict:
        return {"candidates": {label: [p.name for p in passes] for label, passes in self.candidates.items()},
                "max_tokens": self.max_tokens, "seq_len": self.seq_len, "batch_size": self.batch_size}

    def run(self, model: nn.Module, state: MoEState) -> PassResult:
        tokens = calibration_tokens(self.data, self.tokenizer, seq_len=self.seq_len, max_tokens=self.max_tokens).input_ids
        fitness: dict[str, float] = {}
        with progress_bar("choose recipe", total=len(self.candidates), unit="recipe", enabled=self.show_progress) as bar:
            for label, passes in self.candidates.items():
                view = shared_view(model)
                object.__setattr__(view, STATE_ATTR, dataclasses.replace(state, history=[]))
                fitness[label] = _mean_nll(compose(*passes)(view), tokens, self.batch_size)
                del view
                bar.update(1)
                bar.set_postfix(best=f"{min(fitness.values()):.4f}")
        chosen = min(fitness, key=fitness.__getitem__)  # the first of equals: dicts keep the candidates' order
        model = compose(*self.candidates[chosen])(model)
        rerun = _mean_nll(model, tokens, self.batch_size)
        return PassResult(model, True, {"chosen": chosen, "fitness": fitness, "fitness_tokens": int(tokens[:, 1:].numel()),
                                        "chosen_fitness_rerun": rerun})


def _mean_nll(model: nn.Module, tokens, batch_size: int) -> float:
    """Mean next-token NLL of ``model`` in eval mode over ``tokens``, its training mode restored."""
    with eval_mode(model):
        total, count = nll_sum(model, tokens, batch_size=batch_size)
    return total / count
