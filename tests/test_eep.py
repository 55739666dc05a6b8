"""EEP-style evolutionary plan search: determinism, exact fitness, budgets, the shared-weights view."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_qwen3

from moe_fx import PrunePlan, compose, state_of
from moe_fx.errors import BadOptionError
from moe_fx.evaluate import nll_sum
from moe_fx.passes import Calibrate, DropExperts, Score
from moe_fx.passes.eep import EvolutionarySearch, pruned_view

FIT = torch.randint(2, 128, (4, 16), generator=torch.Generator().manual_seed(5))
CALIB = torch.randint(2, 128, (8, 16), generator=torch.Generator().manual_seed(6))


def _search(**options) -> EvolutionarySearch:
    return EvolutionarySearch(FIT, population=6, generations=4, show_progress=False, **options)


def _scored():
    return compose(Calibrate(CALIB, show_progress=False), Score("reap"))(tiny_qwen3())


def test_search_is_deterministic_and_its_fitness_is_exact() -> None:
    runs = []
    for _ in range(2):
        model = compose(DropExperts(ratio=0.5, allocation=_search(seed=3)))(_scored())
        runs.append(state_of(model))
    a, b = runs
    assert a.plan == b.plan and a.search.history == b.search.history
    assert a.search.fitness <= a.search.start_fitness  # the warm start is in the population and never lost
    assert a.search.history == sorted(a.search.history, reverse=True)
    # the reported fitness is the pruned model's real NLL on the fitness tokens
    model = DropExperts(plan=a.plan)(tiny_qwen3())
    s, n = nll_sum(model, FIT)
    assert s / n == pytest.approx(a.search.fitness, abs=1e-6)


def test_global_search_keeps_the_total_budget() -> None:
    model = compose(DropExperts(ratio=0.5, allocation=_search(allocation="global", move_prob=0.9)))(_scored())
    counts = [b.num_experts for b in state_of(model).spec.blocks]
    assert sum(counts) == 8 and min(counts) >= 2


def test_search_without_scores_starts_from_a_seeded_ranking() -> None:
    a = compose(DropExperts(keep=4, allocation=_search(seed=1)))(tiny_qwen3())
    b = compose(DropExperts(keep=4, allocation=_search(seed=1)))(tiny_qwen3())
    assert state_of(a).plan == state_of(b).plan


def test_pruned_view_leaves_the_source_untouched() -> None:
    model = tiny_qwen3()
    spec = state_of(model).spec
    before = model(input_ids=FIT).logits
    params = {n: p for n, p in model.named_parameters()}
    view = pruned_view(model, spec, PrunePlan({b.path: [0, 1, 2] for b in spec.blocks}))
    assert view.get_parameter(spec.blocks[0].experts.tensors[0]).shape[0] == 3
    assert view.model.embed_tokens.weight is model.model.embed_tokens.weight  # shared, not copied
    assert all(p is params[n] for n, p in model.named_parameters())
    assert torch.equal(model(input_ids=FIT).logits, before)


def test_search_options_are_checked() -> None:
    with pytest.raises(BadOptionError, match="needs data"):
        compose(DropExperts(ratio=0.5, allocation=EvolutionarySearch()))(_scored())
    with pytest.raises(BadOptionError, match="allocation"):
        compose(DropExperts(ratio=0.5, allocation=_search(allocation="sideways")))(_scored())


def test_refined_search_measures_the_compensated_model() -> None:
    """With ``refine``, a candidate's fitness is the NLL of the plan *after* compensation, as it will be saved."""
    from moe_fx.passes import CompensateExperts

    calibrated = lambda: compose(Calibrate(CALIB, observers=("routing", "reap", "inputs"), show_progress=False), Score("reap"))(tiny_qwen3())  # noqa: E731
    model = compose(DropExperts(ratio=0.5, allocation=_search(seed=2, refine=CompensateExperts())), CompensateExperts())(calibrated())
    state = state_of(model)
    s, n = nll_sum(model, FIT)
    assert s / n == pytest.approx(state.search.fitness, abs=1e-5)
    assert next(r for r in state.history if r.name == "drop_experts").config["allocation"]["refine"]["name"] == "compensate_experts"  # recorded in moe_fx.json
