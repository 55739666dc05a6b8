"""``moe-fx prune --preset``: each preset runs the pipeline it documents (in memory and streamed), and options the
preset decides are refused in one line before the model is loaded."""

from __future__ import annotations

import dataclasses
import json

import pytest
from prune_cli import FAST_EEP, passes_run, prune_argv

import moe_fx.formats.loading
from moe_fx import cli
from moe_fx.errors import BadOptionError, MoeFxError
from moe_fx.run.presets import PRESETS, preset_options


@pytest.mark.parametrize(("preset", "stream", "expected"), [
    ("best-oneshot", "off", ["calibrate", "score", "drop_experts", "compensate_experts"]),
    ("best-oneshot", "on", ["calibrate", "score", "drop_experts", "compensate_experts"]),
    ("best", "off", ["calibrate", "score", "drop_experts", "compensate_experts", "distill"]),
    ("best", "on", ["calibrate", "score", "drop_experts", "compensate_experts", "distill"]),
    ("best-oneshot-params", "off", ["calibrate"]),  # then the split it chose (test_params_preset_chooses_the_split_on_held_out_tokens)
    ("best-oneshot-params", "on", ["calibrate"]),  # each split streamed, the best kept (test_streamed_params_preset_chooses_its_split)
])
def test_preset_runs_its_pipeline(preset, stream, expected, micro_path, calib_path, tmp_path, capsys, monkeypatch):
    out = tmp_path / preset
    extra = ["--stream", stream, *FAST_EEP] if stream == "off" else ["--stream", stream]
    if preset == "best":  # the same pipeline with 3 distillation steps instead of 300 (test_preset_table checks the 300)
        fast = {key: {**options, "distill_steps": 3} for key, options in (("options", PRESETS["best"].options), ("streamed", PRESETS["best"].streamed))}
        monkeypatch.setitem(PRESETS, "best", dataclasses.replace(PRESETS["best"], **fast))
    code = cli.main(prune_argv(micro_path, calib_path, out, "--preset", preset, *extra))
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    record = json.loads((out / "moe_fx.json").read_text())
    chosen = preset_options(preset, streamed=stream == "on")
    bucketed = record["cli"]["allocation"].startswith("buckets")  # best-oneshot-params' candidate with per-expert widths was kept
    assert f"--preset {preset}" in stdout and all(record["cli"][k] == v for k, v in chosen.items() if not (bucketed and k == "allocation"))
    assert ("streaming" in record) == (stream == "on")
    assert passes_run(out)[: len(expected)] == expected
    assert (record["search"] is not None) == (chosen["method"] == "eep")  # EEP in memory, REAP streamed
    if preset == "best-oneshot-params":
        assert passes_run(out)[-1] == "choose_recipe" and record["cli"]["params_ratio"] == 0.25
    if preset == "best":
        distill = next(p for p in record["passes"] if p["name"] == "distill")
        assert distill["config"]["steps"] == 3 and distill["config"]["lr"] == 1e-3
        assert distill["config"]["batch_size"] == 32 and distill["config"]["micro_batch_size"] == 2  # steps of 32 in parts of --batch-size
        assert distill["report"]["teacher"] == ("cached top-64" if stream == "on" else "model")


@pytest.mark.parametrize(("extra", "message"), [
    (["--preset", "best-oneshot-params", "--ratio", "0.25", "--stream", "off", "--sequential"], "--sequential runs each pruned layer again"),
    (["--method", "reap", "--stream", "on", "--sequential", "--distill-steps", "2", "--distill-teacher", "cached"], "drop --sequential"),
    (["--preset", "best", "--method", "reap"], "--preset best chooses --method itself"),
    (["--preset", "best-oneshot", "--compensate", "--allocation", "uniform"], "chooses --compensate itself"),
    (["--preset", "best-oneshot", "--granularity", "channel"], "chooses --granularity itself"),
    (["--preset", "best", "--distill-batch-size", "16"], "chooses --distill-batch-size itself"),
    (["--distill-steps", "2", "--distill-batch-size", "0"], "--distill-batch-size >= 1"),
    (["--preset", "best-oneshot-params", "--expert-ratio", "0.1"], "chooses --expert-ratio itself"),
    (["--preset", "best-oneshot-params", "--ratio", "1.5"], "give --ratio in (0, 1), not 1.5"),
    (["--preset", "best-oneshot-params", "--expert-shares", "1.5"], "give shares in [0, 1]"),
    (["--preset", "best-oneshot", "--expert-shares", "0.5"], "give shares in [0, 1] with --preset best-oneshot-params"),
    (["--method", "reap", "--expert-shares", "0.5"], "add --preset best-oneshot-params"),
    (["--granularity", "channel", "--method", "obs", "--compensate", "--ratio", "0.05"], "keeps them all; give a ratio above 0.0625"),
    (["--method", "reap", "--ratio", "0.05"], "drops no expert (of 8 a block, rounded)"),
])
def test_refused_before_loading(extra, message, micro_path, calib_path, tmp_path, capsys, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(moe_fx.formats.loading, "load_model", no_load)
    out = tmp_path / "out"
    code = cli.main(prune_argv(micro_path, calib_path, out, *extra))
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not out.exists()


def test_params_preset_chooses_the_split_on_held_out_tokens(micro_path, calib_path, tmp_path, capsys):
    """In memory, ``best-oneshot-params`` tries all of the budget as channels, about half as experts, all as experts
    (``--ratio 0.25`` of 8 experts of width 64: width 48; 1 expert then width 56; 2 experts) and all as channels with
    per-expert widths in buckets (ranked across the model, or each layer at its own budget), keeps the one with the lowest NLL on the held-out fitness windows, and records and
    prints that split; ``--expert-shares`` with one share fixes it."""
    out = tmp_path / "chosen"
    assert cli.main(prune_argv(micro_path, calib_path, out, "--preset", "best-oneshot-params", "--fitness-tokens", "512")) == 0
    stdout = capsys.readouterr().out
    record = json.loads((out / "moe_fx.json").read_text())
    choice = next(p for p in record["passes"] if p["name"] == "choose_recipe")["report"]
    splits = {"experts 0, channels 0.25": (0.0, 0.25), "experts 0.125, channels 0.125": (0.125, 0.125), "experts 0.25, channels 0": (0.25, 0.0),
              "experts 0, channels 0.25, widths in buckets": (0.0, 0.25), "experts 0, channels 0.25, widths in buckets per layer": (0.0, 0.25)}
    assert set(choice["fitness"]) == set(splits) and choice["fitness"][choice["chosen"]] == min(choice["fitness"].values())
    assert choice["chosen_fitness_rerun"] == choice["fitness"][choice["chosen"]] and choice["fitness_tokens"] == 8 * 63
    assert (record["cli"]["expert_ratio"], record["cli"]["ratio"]) == tuple(record["cli"]["params_split"]) == splits[choice["chosen"]]
    allocation = {"widths in buckets": "buckets", "widths in buckets per layer": "buckets-per-layer"}.get(choice["chosen"].partition("0.25, ")[2])
    assert record["cli"]["allocation"] == (allocation or "uniform") and (allocation is not None) == ("expert_storage" in record)
    rewrites = [p for p in passes_run(out) if p in ("drop_experts", "prune_channels")]
    assert rewrites == {(0.0, 0.25): ["prune_channels"], (0.125, 0.125): ["drop_experts", "prune_channels"], (0.25, 0.0): ["drop_experts"]}[splits[choice["chosen"]]]
    assert passes_run(out)[-2:] == ["compensate_experts", "choose_recipe"] and f"split kept: {choice['chosen']}" in stdout
    assert f"kept `{choice['chosen']}` by its NLL on 504 held-out calibration tokens" in (out / "report.md").read_text()
    out = tmp_path / "experts-first"  # the candidates in the order given, the experts-only split first
    assert cli.main(prune_argv(micro_path, calib_path, out, "--preset", "best-oneshot-params", "--expert-shares", "1", "0", "--fitness-tokens", "512")) == 0
    choice = next(p for p in json.loads((out / "moe_fx.json").read_text())["passes"] if p["name"] == "choose_recipe")["report"]
    assert list(choice["fitness"]) == ["experts 0.25, channels 0", "experts 0, channels 0.25"]
    out = tmp_path / "padded"  # stored padded, per-expert widths would not meet the budget: not tried
    assert cli.main(prune_argv(micro_path, calib_path, out, "--preset", "best-oneshot-params", "--expert-storage", "padded", "--fitness-tokens", "512")) == 0
    choice = next(p for p in json.loads((out / "moe_fx.json").read_text())["passes"] if p["name"] == "choose_recipe")["report"]
    assert not any("buckets" in label for label in choice["fitness"])
    out = tmp_path / "fixed"
    assert cli.main(prune_argv(micro_path, calib_path, out, "--preset", "best-oneshot-params", "--expert-shares", "1")) == 0
    assert passes_run(out) == ["calibrate", "score", "drop_experts", "compensate_experts"]
    record = json.loads((out / "moe_fx.json").read_text())["cli"]
    assert record["params_split"] == [0.25, 0.0] and record["granularity"] == "expert" and record["ratio"] == 0.25


def test_params_preset_fixes_the_split_where_trying_them_would_not_fit(micro_path, calib_path, tmp_path, capsys, monkeypatch):
    """Each split tried holds a pruned copy of the experts beside the model: where that exceeds 90% of the memory free,
    the preset keeps the fixed half split and says why, instead of running out of memory midway."""
    import moe_fx.calibrate
    from moe_fx.formats.lazy import meta_model

    meta = meta_model(micro_path)
    weights = sum(p.numel() * p.element_size() for p in meta.parameters())
    monkeypatch.setattr(moe_fx.calibrate, "host_memory_available", lambda: weights)
    out = tmp_path / "fixed"
    assert cli.main([a for a in prune_argv(micro_path, calib_path, out, "--preset", "best-oneshot-params") if a != "--quiet"]) == 0
    stdout = capsys.readouterr().out
    assert "fitted to this machine: the split fixed at about half: trying the splits holds a pruned copy of the experts" in stdout
    assert "choose_recipe" not in passes_run(out) and json.loads((out / "moe_fx.json").read_text())["cli"]["params_split"] == [0.125, 0.125]


def test_streamed_params_preset_chooses_its_split(micro_path, calib_path, tmp_path, capsys):
    """Streamed, ``best-oneshot-params`` streams each split to its own output, keeps the one whose output predicts the
    held-out windows best and records it as in memory: the same choice, on the same NLL, and the same weights (stored
    padded, so the candidate with per-expert widths in buckets, whose budget is global in memory and per layer streamed,
    is not tried). Stored in buckets, the streamed preset tries that candidate too, each layer at its own budget."""
    outs = {stream: tmp_path / stream for stream in ("on", "off")}
    for stream, out in outs.items():
        argv = prune_argv(micro_path, calib_path, out, "--preset", "best-oneshot-params", "--fitness-tokens", "512", "--stream", stream)
        assert cli.main(argv + ["--expert-storage", "padded"] + (["--no-sequential"] if stream == "on" else [])) == 0
    stdout = capsys.readouterr().out
    assert "tries 3 splits (each streamed to its own output)" in stdout
    streamed, in_memory = ({p["name"]: p["report"] for p in json.loads((out / "moe_fx.json").read_text())["passes"]}["choose_recipe"]
                           for out in outs.values())
    assert streamed["chosen"] == in_memory["chosen"] and streamed["fitness"] == pytest.approx(in_memory["fitness"], rel=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["off", "on"]  # no candidate's output left beside them
    record = json.loads((outs["on"] / "moe_fx.json").read_text())
    assert tuple(record["cli"]["params_split"]) == {"experts 0, channels 0.25": (0.0, 0.25), "experts 0.125, channels 0.125": (0.125, 0.125),
                                                    "experts 0.25, channels 0": (0.25, 0.0)}[streamed["chosen"]]
    assert f"kept `{streamed['chosen']}` by its NLL" in (outs["on"] / "report.md").read_text()
    bucketed = tmp_path / "buckets"
    argv = prune_argv(micro_path, calib_path, bucketed, "--preset", "best-oneshot-params", "--fitness-tokens", "512", "--stream", "on")
    assert cli.main(argv) == 0 and "tries 4 splits (each streamed to its own output)" in capsys.readouterr().out
    record = json.loads((bucketed / "moe_fx.json").read_text())
    choice = next(p for p in record["passes"] if p["name"] == "choose_recipe")["report"]
    assert choice["fitness"][choice["chosen"]] == min(choice["fitness"].values()) and len(choice["fitness"]) == 4
    assert (record["cli"]["allocation"] == "buckets-per-layer") == choice["chosen"].endswith("buckets per layer") == ("expert_storage" in record)


def test_streamed_params_preset_fixes_the_split_where_two_outputs_would_not_fit_the_disk(micro_path, tmp_path, monkeypatch):
    """A streamed choice keeps the best candidate's output while writing the next: where two pruned outputs exceed 90%
    of the free disk, the split stays fixed and the CLI says why."""
    import collections
    import shutil

    from moe_fx.cli.prune import _split_choice_disk
    from moe_fx.formats.lazy import meta_model

    meta = meta_model(micro_path)
    assert _split_choice_disk(meta, 0.25, tmp_path / "out") is None
    monkeypatch.setattr(shutil, "disk_usage", lambda path: collections.namedtuple("usage", "total used free")(0, 0, 1000))
    assert "keeps two pruned outputs" in _split_choice_disk(meta, 0.25, tmp_path / "new" / "out") and str(tmp_path) in _split_choice_disk(
        meta, 0.25, tmp_path / "new" / "out")


def test_preset_table():
    assert set(PRESETS) == {"best-oneshot", "best", "best-oneshot-params"}
    assert preset_options("best-oneshot-params")["method"] == preset_options("best-oneshot-params", streamed=True)["method"] == "obs"
    assert preset_options("best-oneshot-params", streamed=True)["sequential"] and "sequential" not in preset_options("best-oneshot-params")
    assert PRESETS["best-oneshot-params"].experts_share == 0.5
    assert preset_options("best-oneshot") == {"method": "eep", "allocation": "global", "compensate": True}
    assert preset_options("best-oneshot", streamed=True)["method"] == "reap"
    assert preset_options("best")["distill_steps"] == preset_options("best", streamed=True)["distill_steps"] == 300
    assert preset_options("best")["distill_batch_size"] == 32 and preset_options("best")["distill_lr"] == 1e-3
    assert preset_options("best", streamed=True)["distill_teacher"] == "cached"
    with pytest.raises(BadOptionError, match="unknown preset"):
        preset_options("fastest")


@pytest.mark.parametrize(("given", "expected"), [([], (1_000_000, 65536)), (["--calib-tokens", "50000", "--compensate-samples", "4096"], (50_000, 4096))])
def test_preset_calibration_budget_is_a_default(given, expected, tmp_path):
    """``best`` takes the data budgets it was measured with (1M calibration tokens, 65,536 compensation samples a
    layer), unless the user gave them."""
    from moe_fx.cli.prune import _apply_preset

    args = cli.build_parser().parse_args(["prune", "src", "--ratio", "0.25", "--out", str(tmp_path / "o"), "--preset", "best", *given])
    _apply_preset(args, stream=False)
    assert (args.calib_tokens, args.compensate_samples) == expected and args.distill_batch_size == 32


def test_fit_to_model_changes_only_what_the_model_cannot_take():
    from moe_fx.run.presets import fit_to_model

    options = preset_options("best")
    same, why = fit_to_model(options, language_model=True, compensation_refused=None, shared_layers=[])
    assert same == options and why == []
    fitted, why = fit_to_model(options, language_model=False, compensation_refused="a norm after each expert", shared_layers=[3])
    assert fitted == {**options, "method": "reap", "allocation": "uniform", "compensate": False} and len(why) == 2
    assert options == preset_options("best")  # the preset's own table is not changed


def test_params_preset_refuses_keep(tmp_path):
    from moe_fx.cli.prune import _apply_preset

    args = cli.build_parser().parse_args(["prune", "src", "--keep", "6", "--out", str(tmp_path / "o"), "--preset", "best-oneshot-params"])
    with pytest.raises(MoeFxError, match="give --ratio in \\(0, 1\\), not --keep"):
        _apply_preset(args, stream=False)


def test_streamed_params_preset_with_several_processes_drops_sequential(tmp_path, capsys):
    """With --nproc only rank 0 rewrites a layer, so the streamed preset runs without --sequential and says so."""
    from moe_fx.cli.prune import _apply_preset

    argv = ["prune", "src", "--ratio", "0.5", "--out", str(tmp_path / "o"), "--preset", "best-oneshot-params"]
    args = cli.build_parser().parse_args(argv + ["--nproc", "2"])
    _apply_preset(args, stream=True)
    stdout = capsys.readouterr().out
    assert not args.sequential and "fitted to this model: no --sequential" in stdout
    # nor can the splits be streamed and measured there: the half split, fixed, and said
    assert not getattr(args, "split_candidates", None) and args.params_split == pytest.approx((0.25, 1 / 3))  # a third of the kept experts' channels
    assert "the split fixed at about half: with --nproc only rank 0 writes" in stdout
    with pytest.raises(MoeFxError, match="with --nproc only rank 0 writes, so a streamed prune cannot measure each split"):
        _apply_preset(cli.build_parser().parse_args(argv + ["--nproc", "2", "--expert-shares", "0", "1"]), stream=True)
    args = cli.build_parser().parse_args(argv)
    _apply_preset(args, stream=True)
    assert args.sequential is True and [x for s in args.split_candidates for x in s] == pytest.approx([0.0, 0.5, 0.25, 1 / 3, 0.5, 0.0])


def test_split_budget_removes_the_ratio_of_routed_parameters():
    """Exact fractions without a shape; with one, whole experts and widths in steps of 8, the removal nearest the
    budget (the larger on a tie) with the experts' share of it within half of the preset's either way."""
    from moe_fx.plan.channel_allocate import channels_to_keep
    from moe_fx.run.presets import split_budget

    for ratio in (0.1, 0.25, 0.5, 0.8):
        experts, channels = split_budget(ratio, 0.5)
        assert experts == ratio / 2 and (1 - experts) * (1 - channels) == pytest.approx(1 - ratio)
    for (num, width, groups), ratio, removed in [((32, 128, 1), 0.25, 0.26171875), ((32, 128, 1), 0.5, 0.505859375), ((128, 768, 1), 0.5, 0.5),
                                                 ((8, 64, 1), 0.25, 0.234375), ((8, 64, 2), 0.5, 0.53125)]:
        experts, channels = split_budget(ratio, 0.5, (num, width, groups))
        dropped, kept = round(experts * num), channels_to_keep(width, channels, 8)
        assert dropped == experts * num and kept % 8 == 0 and 1 - (num - dropped) / num * kept / width == removed
        assert ratio / 4 <= experts <= 3 * ratio / 4 and (num - dropped) % groups == 0
    experts, _ = split_budget(0.25, 0.5, (8, 64, 4))  # no drop keeps whole groups within the range: the nearest that does (none)
    assert experts == 0


def test_only_splits_near_the_budget_compete():
    """The held-out NLL compares pruned models of about the same size: 32 experts of width 32 at 25%, half the budget as
    experts lands at 29.7% (widths step by a quarter), so channels alone and experts alone are tried; width 16 cannot
    lose a quarter of its channels at all, so experts alone remain."""
    from moe_fx.run.presets import near_budget, removed_share, split_budget

    splits = lambda shape, ratio: list(dict.fromkeys(split_budget(ratio, share, shape) for share in (0, 0.5, 1)))
    assert [round(removed_share(s, (32, 32, 1)), 4) for s in splits((32, 32, 1), 0.25)] == [0.25, 0.2969, 0.25]
    assert near_budget(splits((32, 32, 1), 0.25), 0.25, (32, 32, 1)) == [(0.0, 0.25), (0.25, 0.0)]
    assert near_budget(splits((64, 16, 1), 0.25), 0.25, (64, 16, 1)) == [(0.25, 0.0)]
    assert near_budget(splits((32, 128, 1), 0.25), 0.25, (32, 128, 1)) == splits((32, 128, 1), 0.25)  # 26.2%: within 2 points


def test_splits_the_model_cannot_take_are_not_tried():
    """8 experts with top-2: dropping 90% of them leaves fewer than top-k, so that split is left out, not the run refused."""
    from conftest import tiny_qwen3

    from moe_fx.pipeline import state_of
    from moe_fx.run.presets import feasible_splits

    spec = state_of(tiny_qwen3()).spec
    assert feasible_splits(spec, [(0.0, 0.9), (0.5, 0.8), (0.9, 0.0)]) == [(0.0, 0.9), (0.5, 0.8)]
    assert feasible_splits(spec, [(0.9, 0.0)]) == [(0.9, 0.0)]  # nothing feasible: as given, for the refusal to name it


def test_params_preset_fitted_to_families_without_channels_or_a_language_model():
    """Channels the family cannot score (Llama 4's prescaled experts) fall back to experts alone, which remove the same
    share of the routed parameters; obs channels need no next-token NLL, so a model without one keeps the pipeline."""
    from moe_fx.run.presets import fit_to_model

    options = preset_options("best-oneshot-params")
    fitted, why = fit_to_model(options, language_model=True, compensation_refused=None, shared_layers=[], channels_refused="prescaled experts")
    assert fitted == {"method": "reap", "allocation": "uniform", "compensate": True} and "prescaled experts" in why[0]
    fitted, why = fit_to_model(options, language_model=False, compensation_refused=None, shared_layers=[])
    assert fitted == options and why == []


def test_preset_sample_is_lowered_to_what_the_machine_holds(micro_path, calib_path, tmp_path, capsys, monkeypatch):
    """The presets' 65,536 compensation tokens a layer are a default: where an in-memory prune's sample would not fit
    the CPU memory available, the preset takes the largest halving that fits (not below the CLI's 16,384) and says so;
    below that, the refusal stands."""
    import moe_fx.calibrate
    from moe_fx.calibrate.observers import InputObserver
    from moe_fx.formats.lazy import meta_model
    from moe_fx.pipeline import state_of

    blocks = state_of(meta_model(micro_path)).spec.blocks
    need = lambda n: sum(InputObserver(samples=n).accumulator_bytes(b) for b in blocks)
    argv = [a for a in prune_argv(micro_path, calib_path, tmp_path / "out", "--preset", "best-oneshot", *FAST_EEP) if a != "--quiet"]
    at = argv.index("--compensate-samples")
    del argv[at : at + 2]  # the preset's own sample size
    monkeypatch.setattr(moe_fx.calibrate, "host_memory_available", lambda: need(40000))
    assert cli.main(argv) == 0
    assert "fitted to this machine: --compensate-samples 32768" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "moe_fx.json").read_text())["cli"]["compensate_samples"] == 32768
    monkeypatch.setattr(moe_fx.calibrate, "host_memory_available", lambda: need(8000))
    argv[argv.index("--out") + 1] = str(tmp_path / "out2")
    assert cli.main(argv) == 2 and "sampled tokens in CPU memory" in capsys.readouterr().err


def test_no_sequential_beside_the_params_preset(micro_path, calib_path, tmp_path, capsys):
    """``--sequential`` is the streamed preset's default, not its choice: ``--no-sequential`` runs the plain streamed variant."""
    out = tmp_path / "plain"
    assert cli.main(prune_argv(micro_path, calib_path, out, "--preset", "best-oneshot-params", "--stream", "on", "--no-sequential")) == 0
    stdout = capsys.readouterr().out
    record = json.loads((out / "moe_fx.json").read_text())
    assert "streaming" in record and record["cli"]["sequential"] is False and "--sequential" not in stdout
