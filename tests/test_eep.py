"""EEP-style evolutionary plan search: determinism, exact fitness, budgets, the shared-weights view."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_qwen3

from moe_fx import PrunePlan, compose, state_of
from moe_fx.errors import BadOptionError
from moe_fx.evaluate.nll import nll_sum
from moe_fx.passes import Calibrate, DropExperts, Score
from moe_fx.plan.eep import EvolutionarySearch, pruned_view

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

    calibrated = lambda: compose(Calibrate(CALIB, observers=("routing", "reap", "inputs"), show_progress=False), Score("reap"))(tiny_qwen3())
    model = compose(DropExperts(ratio=0.5, allocation=_search(seed=2, refine=CompensateExperts())), CompensateExperts())(calibrated())
    state = state_of(model)
    s, n = nll_sum(model, FIT)
    assert s / n == pytest.approx(state.search.fitness, abs=1e-5)
    assert next(r for r in state.history if r.name == "drop_experts").config["allocation"]["refine"]["name"] == "compensate_experts"  # recorded in moe_fx.json


def test_time_limit_holds_within_a_generation(monkeypatch) -> None:
    """``max_seconds`` is checked before each candidate: the search overruns it by at most one fitness evaluation,
    even when one generation's evaluations would take many times the limit (the warm start is always measured)."""
    import time

    from moe_fx.plan import eep

    def slow_nll(*args, **kwargs):
        time.sleep(0.2)
        return nll_sum(*args, **kwargs)

    monkeypatch.setattr(eep, "nll_sum", slow_nll)
    search = EvolutionarySearch(FIT, population=8, generations=5, max_seconds=0.5, show_progress=False)
    model = compose(DropExperts(ratio=0.5, allocation=search))(_scored())
    search = state_of(model).search
    assert 2 <= search.evaluations <= 5  # a generation alone is 8 evaluations (1.6 s)
    assert search.seconds < 0.5 + 0.2 + 0.3
    assert search.fitness <= search.start_fitness


def test_cli_search_saves_the_plan_it_found(capsys, micro_path, calib_path, tmp_path) -> None:
    """Through the command line, on the trained micro model: the checkpoint EEP + compensation writes is the
    searched plan, compensated: reloaded, its NLL on the search's fitness windows is the fitness the search
    reported for its best plan (not the warm start's)."""
    import json

    from moe_fx import cli
    from moe_fx.calibrate.data import pack, read_documents, split_fitness
    from moe_fx.formats.loading import load_model, load_tokenizer

    out = tmp_path / "eep"
    argv = ["prune", micro_path, "--method", "eep", "--allocation", "global", "--compensate", "--ratio", "0.25",
            "--calib", calib_path, "--calib-tokens", "4096", "--seq-len", "128", "--fitness-tokens", "1024",
            "--eep-population", "6", "--eep-generations", "3", "--compensate-samples", "1024", "--no-eval", "--quiet",
            "--device", "cpu", "--out", out]
    assert cli.main(argv) == 0
    record = json.loads((out / "moe_fx.json").read_text())
    search = record["search"]
    assert "eep search: fitness NLL" in capsys.readouterr().out
    windows = pack(load_tokenizer(micro_path), read_documents(calib_path), seq_len=128, max_tokens=4096 + 1024, seed=0)
    _, fitness = split_fitness(windows, 1024)
    saved = load_model(out)
    assert sorted(b.num_experts for b in state_of(saved).spec.blocks) != [6, 6]  # global: the counts moved
    s, n = nll_sum(saved, fitness)
    assert s / n == pytest.approx(search["fitness"], abs=2e-4)
