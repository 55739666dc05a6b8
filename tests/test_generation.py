"""Generation agreement: greedy continuations of held-out prompts against the reference model's."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_qwen3

from moe_fx import PrunePlan, state_of
from moe_fx.cli import main
from moe_fx.evaluate import generation
from moe_fx.evaluate.nll import EvalSet
from moe_fx.passes import DropExperts

PROMPTS = torch.randint(3, 128, (6, 12), generator=torch.Generator().manual_seed(0))


def _pruned(model):
    spec = state_of(model).spec
    return DropExperts(plan=PrunePlan({b.path: [0, 2, 4, 6] for b in spec.blocks}))(model)


def test_greedy_is_transformers_greedy():
    model = tiny_qwen3()
    ours = generation.greedy(model, PROMPTS, 8, batch_size=4)
    with torch.no_grad():
        theirs = model.generate(PROMPTS, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)[:, PROMPTS.shape[1]:]
    assert torch.equal(ours, theirs)


@pytest.fixture(scope="module")
def micro(micro_path):
    from moe_fx.formats.loading import load_model

    return lambda: load_model(micro_path, dtype="float32")


MICRO_PROMPTS = torch.randint(3, 8000, (6, 12), generator=torch.Generator().manual_seed(0))


def test_a_model_agrees_with_itself_and_a_pruned_one_does_not(micro):
    model = micro()
    ref = generation.reference(model, MICRO_PROMPTS, 8)
    same = generation.agreement(model, ref)
    assert same["exact_match"] == 1.0 and same["prefix_tokens"] == 8 and same["token_match"] == 1.0 and abs(same["kl"]) < 1e-6
    pruned = generation.agreement(_pruned(micro()), ref)
    assert pruned["token_match"] < 1.0 and pruned["kl"] > 0.01 and 0 <= pruned["prefix_tokens"] < 8
    assert generation.agreement(model, ref) == same  # deterministic


def test_binned_kl_is_a_lower_bound(monkeypatch, micro):
    model, pruned = micro(), _pruned(micro())
    full = generation.agreement(pruned, generation.reference(model, MICRO_PROMPTS, 6))
    monkeypatch.setattr(generation, "FULL_KL_ELEMENTS", 0)
    monkeypatch.setattr(generation, "TOP_TOKENS", 8)
    binned = generation.agreement(pruned, generation.reference(model, MICRO_PROMPTS, 6))
    assert binned["kl_bins"] == "top 8 + rest" and full["kl_bins"] == "full"
    assert 0 < binned["kl"] <= full["kl"] + 1e-6 and binned["token_match"] == full["token_match"]


def test_prompts_take_every_domain_in_turn():
    windows = {"a": torch.arange(40).view(4, 10), "b": 100 + torch.arange(20).view(2, 10)}
    prompts = generation.generation_prompts(EvalSet(windows, "x"), prompts=5, prompt_len=3)
    assert prompts[:, 0].tolist() == [0, 100, 10, 110, 20]
    with pytest.raises(Exception, match="evaluation text gives 6"):
        generation.generation_prompts(EvalSet(windows, "x"), prompts=7, prompt_len=3)


def test_cli_eval_and_prune_generate(capsys, micro_path, calib_path, valid_path, tmp_path):
    out = tmp_path / "pruned"
    code = main(["prune", str(micro_path), "--method", "reap", "--ratio", "0.25", "--calib", str(calib_path), "--calib-tokens", "4096",
                 "--seq-len", "128", "--eval-data", str(valid_path), "--eval-seqs", "2", "--eval-seq-len", "64", "--eval-generate", "8",
                 "--generate-tokens", "8", "--prompt-len", "16", "--quiet", "--device", "cpu", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0 and "greedy continuations against the unpruned model: 8 prompts" in stdout
    gen = __import__("json").loads((out / "moe_fx.json").read_text())["generation"]
    assert gen["token_match"] < 1.0 and gen["kl"] > 0.01  # the trained micro model's continuations do change
    assert "## Generation agreement" in (out / "report.md").read_text()
    code = main(["eval", str(micro_path), str(out), "--data", str(valid_path), "--eval-seqs", "2", "--eval-seq-len", "64", "--generate", "8",
                 "--generate-tokens", "8", "--prompt-len", "16", "--quiet", "--device", "cpu"])
    assert code == 0 and "greedy continuations against qwen3moe-micro" in capsys.readouterr().out
    assert main(["eval", str(micro_path), "--generate", "4", "--tasks", "piqa", "--task-data", "x"]) == 2
    assert "--generate compares" in capsys.readouterr().err
    code = main(["prune", str(micro_path), "--ratio", "0.25", "--calib", str(calib_path), "--stream", "on", "--eval-generate", "4",
                 "--out", str(tmp_path / "s")])
    assert code == 2 and "--eval-generate needs the whole model" in capsys.readouterr().err
