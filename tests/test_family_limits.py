"""Families that cannot take every option: what they cannot take is refused in one line before the model is loaded,
and ``--preset`` runs the nearest pipeline they can take, saying why (tiny checkpoints written as the hub lays them out)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prune_cli import FAST_EEP, passes_run, prune_argv

import moe_fx.formats.loading
from moe_fx import cli


def _no_load(monkeypatch) -> None:
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(moe_fx.formats.loading, "load_model", no_load)


FITTED = [
    ("openai_privacy_filter", {"method": "reap", "allocation": "uniform", "compensate": True}, "not a causal language model"),
    ("ernie4_5_vl_moe", {"method": "eep", "allocation": "uniform", "compensate": True}, "hold several expert blocks"),
    ("muse_spark", {"method": "eep", "allocation": "global", "compensate": False}, "normalises each expert's output"),
    ("llama4", {"method": "eep", "allocation": "global", "compensate": True}, None),
]
"""Families that cannot take all of ``best-oneshot`` (a token classifier, two expert blocks a layer, a norm after
each expert): what the preset runs instead, and a phrase of the printed reason; and Llama 4 (its experts take the
routing weight on their input), which takes all of it (None: nothing fitted)."""


@pytest.fixture(scope="module")
def family_checkpoints(tmp_path_factory, micro_path) -> dict[str, Path]:
    from tiny_models import tiny_checkpoint

    root = tmp_path_factory.mktemp("preset_families")
    paths = {f: tiny_checkpoint(f, root / f, tokenizer_from=micro_path) for f, _, _ in FITTED}
    paths["foreign_tokenizer"] = tiny_checkpoint("qwen3_moe", root / "foreign", tokenizer_from=micro_path, vocab_size=128)
    return paths


@pytest.mark.parametrize(("family", "options", "reason"), FITTED)
def test_preset_is_fitted_to_the_family(family, options, reason, family_checkpoints, calib_path, tmp_path, capsys):
    """``--preset best-oneshot`` runs on a family that cannot take all of it, with the nearest pipeline it can take
    and one printed line per change saying why (it used to stop, after calibrating, on the part the family refuses)."""
    out = tmp_path / family
    code = cli.main(prune_argv(family_checkpoints[family], calib_path, out, "--preset", "best-oneshot", *FAST_EEP))
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert ("fitted to this model" in stdout) == (reason is not None) and (reason or "") in stdout
    record = json.loads((out / "moe_fx.json").read_text())
    assert {k: record["cli"][k] for k in options} == options
    assert ("compensate_experts" in passes_run(out)) == options["compensate"]


@pytest.mark.parametrize(("family", "extra", "message"), [
    ("openai_privacy_filter", ["--method", "reap", "--eval-data", "CALIB"], "is not a causal language model, so NLL evaluation"),
    ("openai_privacy_filter", ["--method", "eep", *FAST_EEP], "--method eep (its fitness is the NLL)"),
    ("openai_privacy_filter", ["--granularity", "channel", "--method", "fisher"], "--method fisher (gradients of the NLL)"),
    ("foreign_tokenizer", ["--method", "reap"], "the tokenizer gives token id"),
    ("ernie4_5_vl_moe", ["--method", "reap", "--allocation", "global"], "--allocation global moves experts between blocks"),
    ("llama4", ["--method", "naee"], "scale their input by the routing weight"),
])
def test_what_the_family_cannot_take_is_refused_before_loading(family, extra, message, family_checkpoints, calib_path, tmp_path, capsys, monkeypatch):
    _no_load(monkeypatch)
    argv = prune_argv(family_checkpoints[family], calib_path, tmp_path / "out", *[str(calib_path) if a == "CALIB" else a for a in extra])
    if "--eval-data" in extra:
        argv.remove("--no-eval")
    code = cli.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "out").exists()



def test_eval_of_a_model_that_does_not_predict_next_tokens_is_refused_before_loading(family_checkpoints, valid_path, capsys, monkeypatch):
    _no_load(monkeypatch)
    code = cli.main(["eval", str(family_checkpoints["openai_privacy_filter"]), "--data", str(valid_path), "--device", "cpu"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "is not a causal language model, so NLL evaluation" in lines[0], lines


def test_experts_narrower_or_wider_than_the_router_are_sampled_at_their_own_width(tokens):
    """MuseSpark's experts run at ``moe_hidden_size`` (4096 in the tiny config), not at the router's width (64): the
    spec takes the experts' own width, so the sampled observers (NAEE, SHAPE, merging, REAM) record their outputs
    (they failed with a shape mismatch after calibrating)."""
    from tiny_models import tiny_model

    from moe_fx import compose, state_of
    from moe_fx.passes import Calibrate

    model = tiny_model("muse_spark")
    block = state_of(model).spec.blocks[0]
    width = model.get_submodule(block.experts.path).hidden_dim
    assert block.experts.hidden_size == width != model.get_submodule(block.router.weight.rsplit(".", 1)[0]).weight.shape[1]
    stats = state_of(compose(Calibrate(data=tokens, observers=("routing", "samples"), samples_per_block=8, show_progress=False))(model)).stats
    assert stats.per_block[block.path]["sample_expert_out"].shape == (8, block.num_experts, width)
