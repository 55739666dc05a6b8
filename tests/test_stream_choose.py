"""ChooseRecipe streamed: each candidate streamed to its own output and measured there; the kept output is the winner's
streamed prune alone, its choice the one the in-memory pass makes, and nothing of the others is left on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moe_fx import compose
from moe_fx.errors import BadOptionError
from moe_fx.evaluate.nll import EvalSet
from moe_fx.formats.loading import load_model
from moe_fx.passes import Calibrate, ChooseRecipe, CompensateExperts, DropExperts, PruneChannels, Score
from moe_fx.pipeline import state_of
from moe_fx.run import stream_choose as stream_choose_module
from moe_fx.run.streaming import stream_evaluate, stream_prune

TOKENS = torch.randint(3, 128, (6, 24), generator=torch.Generator().manual_seed(3))
FITNESS = torch.randint(3, 128, (3, 24), generator=torch.Generator().manual_seed(4))


def _calibrate() -> Calibrate:
    return Calibrate(TOKENS, batch_size=4, observers=("routing", "reap", "inputs"), inputs_per_block=128, show_progress=False)


def _candidates() -> dict:
    return {
        "experts": (Score("reap"), DropExperts(ratio=0.25), CompensateExperts()),
        "channels": (Score("obs"), PruneChannels(ratio=0.25, multiple=8), CompensateExperts()),
        "both": (Score("reap"), DropExperts(ratio=0.125), Score("obs"), PruneChannels(ratio=0.125, multiple=8), CompensateExperts()),
    }


def _choose() -> ChooseRecipe:
    return ChooseRecipe(_candidates(), data=FITNESS, batch_size=2, show_progress=False)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_streamed_choice_keeps_the_winners_own_streamed_prune(micro_path, tmp_path):
    run = stream_prune(micro_path, tmp_path / "out", [_calibrate(), _choose()], show_progress=False)
    assert run.out == tmp_path / "out" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the other candidates are gone
    record = json.loads((run.out / "moe_fx.json").read_text())
    choice = record["passes"][-1]
    assert choice["name"] == "choose_recipe" and run.state.report_of("choose_recipe") == choice["report"]
    fitness, chosen = choice["report"]["fitness"], choice["report"]["chosen"]
    assert fitness[chosen] == min(fitness.values()) and len(set(fitness.values())) == 3
    assert (run.out / "report.md").is_file()

    alone = stream_prune(micro_path, tmp_path / "alone", [_calibrate(), *_candidates()[chosen]], show_progress=False).out
    kept, own = _tensors(run.out), _tensors(alone)
    assert kept.keys() == own.keys() and all(torch.equal(t, own[k]) for k, t in kept.items())
    held_out = EvalSet({"fitness": FITNESS}, source="test")
    assert stream_evaluate(run.out, held_out, batch_size=2, show_progress=False)["all"]["nll"] == fitness[chosen]

    # the same choice as in memory, on the same NLL (streamed prunes and evaluations equal the in-memory ones on the CPU)
    in_memory = state_of(compose(_calibrate(), _choose())(load_model(micro_path))).report_of("choose_recipe")
    assert in_memory["chosen"] == chosen
    assert fitness == pytest.approx(in_memory["fitness"], rel=1e-6)


def test_a_failed_choice_leaves_no_candidate_output(micro_path, tmp_path, monkeypatch):
    calls = []

    def failing(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("evaluation failed")
        return stream_evaluate(path, *args, **kwargs)

    monkeypatch.setattr("moe_fx.run.streaming.stream_evaluate", failing)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        stream_prune(micro_path, tmp_path / "out", [_calibrate(), _choose()], show_progress=False)
    assert len(calls) == 2 and not list(tmp_path.iterdir())


@pytest.mark.parametrize(("passes", "options", "message"), [
    (lambda: [_calibrate(), _choose(), _choose()], {}, "exactly one ChooseRecipe"),
    (lambda: [_calibrate(), _choose()], {"teacher_cache": "cache"}, "cache the teacher"),
])
def test_refusals(micro_path, tmp_path, passes, options, message):
    with pytest.raises(BadOptionError, match=message):
        stream_prune(micro_path, tmp_path / "out", passes(), show_progress=False, **options)
    assert not list(tmp_path.iterdir())


def test_several_processes_are_refused(micro_path, tmp_path, monkeypatch):
    monkeypatch.setattr(stream_choose_module.distributed, "active", lambda: True)
    with pytest.raises(BadOptionError, match="one process"):
        stream_prune(micro_path, tmp_path / "out", [_calibrate(), _choose()], show_progress=False)
