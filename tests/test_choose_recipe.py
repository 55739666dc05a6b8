"""ChooseRecipe: every candidate is measured on a view that leaves the model alone, the lowest held-out NLL wins, and
the model ends up exactly as the winner's passes make it on their own."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_qwen3

from moe_fx.errors import BadOptionError
from moe_fx.evaluate.nll import nll_sum
from moe_fx.passes import Calibrate, ChooseRecipe, CompensateExperts, DropExperts, PruneChannels, Score
from moe_fx.pipeline import compose, state_of
from moe_fx.plan.eep import shared_view

OBSERVERS = ("routing", "reap", "inputs")


def _calibration() -> torch.Tensor:
    return torch.randint(2, 128, (8, 32), generator=torch.Generator().manual_seed(3))


def _fitness() -> torch.Tensor:
    return torch.randint(2, 128, (4, 32), generator=torch.Generator().manual_seed(4))


def _candidates() -> dict:
    return {
        "experts": (Score("reap"), DropExperts(ratio=0.5), CompensateExperts()),
        "channels": (Score("obs"), PruneChannels(ratio=0.5, multiple=8), CompensateExperts()),  # width 16 of the tiny model: 8 kept
        "both": (Score("reap"), DropExperts(ratio=0.25), Score("obs"), PruneChannels(ratio=0.5, multiple=8), CompensateExperts()),
    }


def test_the_lowest_fitness_wins_and_the_model_is_the_winners_own_prune():
    calibrate = Calibrate(_calibration(), observers=OBSERVERS, batch_size=4, inputs_per_block=256, show_progress=False)
    model = tiny_qwen3()
    pruned = compose(calibrate, ChooseRecipe(_candidates(), data=_fitness(), batch_size=2, show_progress=False))(model)
    report = state_of(pruned).report_of("choose_recipe")
    fitness, chosen = report["fitness"], report["chosen"]
    assert set(fitness) == {"experts", "channels", "both"} and fitness[chosen] == min(fitness.values())
    assert len(set(fitness.values())) == 3  # three different models were measured
    assert report["chosen_fitness_rerun"] == fitness[chosen]  # the model is the one the fitness measured
    assert report["fitness_tokens"] == 4 * 31

    alone = compose(calibrate, *_candidates()[chosen])(tiny_qwen3())
    assert pruned.state_dict().keys() == alone.state_dict().keys()
    assert all(torch.equal(t, alone.state_dict()[n]) for n, t in pruned.state_dict().items())
    assert pruned.config.to_dict() == alone.config.to_dict()
    history = [r.name for r in state_of(pruned).history]
    assert history == ["calibrate", *(p.name for p in _candidates()[chosen]), "choose_recipe"]
    s, n = nll_sum(pruned.eval(), _fitness(), batch_size=2)
    assert s / n == pytest.approx(fitness[chosen], rel=1e-12)


def test_candidates_never_change_the_source_tensors():
    """A candidate that compensates blocks it did not rewrite (no drop, no channels) works on its view's own copy."""
    model = compose(Calibrate(_calibration(), observers=OBSERVERS, batch_size=4, inputs_per_block=256, show_progress=False))(tiny_qwen3())
    before = {n: t.clone() for n, t in model.state_dict().items()}
    view = shared_view(model)
    object.__setattr__(view, "moe_fx_state", state_of(model))
    compose(CompensateExperts(ridge=0.01))(view)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    assert any(not torch.equal(t, before[n]) for n, t in view.state_dict().items())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"candidates": {}, "data": _fitness()}, "at least one candidate"),
    ({"candidates": {"a": (Score("reap"),)}}, "needs data"),
    ({"candidates": {"a": ()}, "data": _fitness()}, "candidate 'a'"),
])
def test_bad_candidates_are_refused(kwargs, message):
    with pytest.raises(BadOptionError, match=message):
        ChooseRecipe(**kwargs)
