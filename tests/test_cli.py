"""The CLI end to end on the trained micro model, and every bad input failing with one clear line."""

import json
import shutil
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from moe_fx.cli import main

FAST = ["--calib-tokens", "4096", "--seq-len", "128", "--eval-seqs", "2", "--eval-seq-len", "128", "--quiet"]


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_prune_eval_inspect_roundtrip(capsys, micro_path, calib_path, valid_path, tmp_path):
    out = tmp_path / "pruned"
    code, stdout, err = _run(capsys, "prune", micro_path, "--method", "reap", "--ratio", "0.25", "--calib", calib_path, "--eval-data", valid_path, "--out", out, *FAST)
    assert code == 0, err
    assert "NLL mean" in stdout and "parameters" in stdout and "weights on disk" in stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_experts == 6 and model.model.layers[1].mlp.experts.down_proj.shape[0] == 6
    code, stdout, _ = _run(capsys, "eval", micro_path, out, "--data", valid_path, "--eval-seqs", "2", "--eval-seq-len", "128", "--quiet")
    assert code == 0 and "delta pruned" in stdout
    code, stdout, _ = _run(capsys, "inspect", out, "--verify")
    assert code == 0 and "ok" in stdout and "qwen3_moe" in stdout and "stored weights: not quantized" in stdout


def test_console_script_runs(micro_path):
    proc = subprocess.run([sys.executable, "-m", "moe_fx", "inspect", str(micro_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "model.layers.1.mlp" in proc.stdout


@pytest.fixture
def dense_dir(tmp_path):
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "dense")
    return tmp_path / "dense"


@pytest.fixture
def corrupt_dir(micro_path, tmp_path):
    d = tmp_path / "corrupt"
    shutil.copytree(micro_path, d)
    (d / "model.safetensors").chmod(0o644)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 3])
    return d


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such file or directory"),
        ("not_model", "not a model directory"),
        ("dense", "no block with routed experts"),
        ("corrupt", "corrupt safetensors file"),
        ("ratio_zero", "ratio must be in (0, 1)"),
        ("ratio_one", "ratio must be in (0, 1)"),
        ("below_top_k", "fewer than top-k=2"),
        ("empty_calib", "holds no text"),
        ("unreadable_calib", "unreadable"),
        ("out_exists", "already exists"),
        ("out_is_source", "overlaps the source"),
        ("unknown_method", "unknown scoring method"),
    ],
)
def test_bad_input_fails_with_one_line(case, message, capsys, micro_path, calib_path, tmp_path, dense_dir, corrupt_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    garbage = tmp_path / "garbage.jsonl.gz"
    garbage.write_bytes(b"\x1f\x8b\x08garbage")
    (tmp_path / "exists").mkdir()
    (tmp_path / "notmodel").mkdir()
    model, out, extra = micro_path, tmp_path / "out", ["--ratio", "0.25", "--calib", calib_path]
    if case == "missing":
        model = tmp_path / "nowhere"
    elif case == "not_model":
        model = tmp_path / "notmodel"
    elif case == "dense":
        model = dense_dir
    elif case == "corrupt":
        model = corrupt_dir
    elif case == "ratio_zero":
        extra = ["--ratio", "0", "--calib", calib_path]
    elif case == "ratio_one":
        extra = ["--ratio", "1", "--calib", calib_path]
    elif case == "below_top_k":
        extra = ["--ratio", "0.9", "--calib", calib_path]
    elif case == "empty_calib":
        extra = ["--ratio", "0.25", "--calib", empty]
    elif case == "unreadable_calib":
        extra = ["--ratio", "0.25", "--calib", garbage]
    elif case == "out_exists":
        out = tmp_path / "exists"
    elif case == "out_is_source":
        out = model
    elif case == "unknown_method":
        extra += ["--method", "magic"]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, err = _run(capsys, "prune", model, "--out", out, *extra, *FAST)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("moe-fx")]
    assert len(lines) == 1 and message in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no partial output


def test_reap_beats_random_on_trained_micro(micro_path, calib_path, valid_path):
    """REAP's held-out NLL after dropping 25% of experts beats the mean over random drops (3 seeds)."""
    from moe_fx import compose
    from moe_fx.calibrate.data import calibration_tokens
    from moe_fx.evaluate.nll import build_eval_set, evaluate_nll
    from moe_fx.formats.loading import load_model, load_tokenizer
    from moe_fx.passes import Calibrate, DropExperts, Score

    tok = load_tokenizer(micro_path)
    eval_set = build_eval_set(valid_path, tok, seq_len=256, seqs_per_domain=4)
    calib = calibration_tokens(calib_path, tok, seq_len=256, max_tokens=40_000)

    def nll(method, seed=0):
        m = compose(Calibrate(calib, show_progress=False), Score(method, seed=seed), DropExperts(ratio=0.25))(load_model(micro_path, dtype="float32"))
        return evaluate_nll(m, eval_set, show_progress=False)["mean"]["nll"]

    reap = nll("reap")
    random_mean = sum(nll("random", s) for s in range(3)) / 3
    assert reap < random_mean - 0.05, (reap, random_mean)


def test_prune_with_naee_search(capsys, micro_path, calib_path, tmp_path):
    import json

    out = tmp_path / "naee"
    code, stdout, err = _run(capsys, "prune", micro_path, "--method", "naee", "--ratio", "0.25", "--calib", calib_path, "--no-eval", "--out", out, *FAST)
    assert code == 0, err
    record = json.loads((out / "moe_fx.json").read_text())
    assert record["scores"]["method"] == "naee"
    assert "sample_expert_out" in record["calibration"]["statistics"]
    assert all(len(v) == 6 for v in record["plan"]["kept_experts"].values())


@pytest.mark.parametrize(
    "argv, method",
    [
        (["--method", "shape"], "shape"),
        (["--method", "merge-reap"], "reap"),
        (["--method", "ream", "--compensate", "--compensate-samples", "512"], "reap"),
        (["--method", "reap", "--allocation", "global"], "reap"),
        (["--method", "reap", "--compensate", "--compensate-samples", "512"], "reap"),
        (["--method", "eep", "--eep-population", "3", "--eep-generations", "1", "--fitness-tokens", "256", "--allocation", "global"], "reap"),
    ],
)
def test_prune_with_every_method(argv, method, capsys, micro_path, calib_path, tmp_path):
    """Each method runs from the CLI and writes a checkpoint that moe_fx.load reloads with the kept counts."""
    import json

    from moe_fx import load, state_of

    out = tmp_path / "pruned"
    code, stdout, err = _run(capsys, "prune", micro_path, *argv, "--ratio", "0.25", "--calib", calib_path, "--no-eval", "--out", out, *FAST)
    assert code == 0, err
    record = json.loads((out / "moe_fx.json").read_text())
    assert record["scores"]["method"] == method
    kept = {k: len(v) for k, v in record["plan"]["kept_experts"].items()}
    assert sum(kept.values()) == 12  # 25% of 2 x 8 experts dropped
    assert [b.num_experts for b in state_of(load(out)).spec.blocks] == list(kept.values())
    merge = next((p["report"] for p in record["passes"] if p["name"] == "merge_experts"), None)
    if "merge-reap" in argv or "ream" in argv:
        assert merge["grouping"] == ("ream" if "ream" in argv else "nearest") and merge["merged"] == 4
    else:
        assert merge is None
    if "eep" in argv:
        assert record["search"]["evaluations"] >= 2 and "eep search: fitness NLL" in stdout
    if "--compensate" in argv:
        report = record["passes"][-1]
        assert report["name"] == "compensate_experts" and "block output error" in stdout
        assert report["report"]["mean_error_after"] < report["report"]["mean_error_before"]


def test_prune_with_distillation(capsys, micro_path, calib_path, valid_path, tmp_path):
    """--distill-steps fine-tunes after the rewrite, towards the source model (read, never written)."""
    out = tmp_path / "pruned"
    before = {p.name: p.stat().st_mtime_ns for p in micro_path.iterdir()}
    code, stdout, err = _run(capsys, "prune", micro_path, "--method", "reap", "--ratio", "0.25", "--distill-steps", "4", "--calib", calib_path,
                             "--eval-data", valid_path, "--out", out, *FAST)
    assert code == 0, err
    record = json.loads((out / "moe_fx.json").read_text())
    distill = record["passes"][-1]
    assert distill["name"] == "distill" and distill["report"]["steps"] == 4 and "distillation: KL to the unpruned model" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in micro_path.iterdir()} == before
    code, _, err = _run(capsys, "prune", micro_path, "--method", "reap", "--ratio", "0.25", "--distill-steps", "-1", "--calib", calib_path,
                        "--out", tmp_path / "bad", *FAST)
    assert code == 2 and "--distill-steps must be >= 0" in err and not (tmp_path / "bad").exists()
    code, _, err = _run(capsys, "prune", micro_path, "--method", "reap", "--ratio", "0.25", "--distill-steps", "2", "--distill-train", "adapters",
                        "--distill-rank", "0", "--calib", calib_path, "--out", tmp_path / "bad", *FAST)
    assert code == 2 and "--distill-rank" in err and "got 2, None, 64, 0 and None" in err and not (tmp_path / "bad").exists()


def test_eep_needs_room_for_its_fitness_set(capsys, micro_path, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("The markets rose today as traders bought shares of banks and oil companies. " * 40)
    code, _, err = _run(capsys, "prune", micro_path, "--method", "eep", "--ratio", "0.25", "--calib", small, "--fitness-tokens", "8192",
                        "--out", tmp_path / "o", *FAST)
    assert code == 2 and "fitness tokens leaves no calibration windows" in err
    assert not (tmp_path / "o").exists()


def test_prune_channels_end_to_end(capsys, micro_path, calib_path, valid_path, tmp_path):
    """Fisher channels at a uniform width give a stock checkpoint; HEAPr's per-expert widths in buckets store the budget,
    evaluate, and prune again."""
    from moe_fx import load

    out = tmp_path / "fisher"
    code, stdout, err = _run(capsys, "prune", micro_path, "--granularity", "channel", "--ratio", "0.5", "--calib", calib_path, "--out", out, *FAST)
    assert code == 0, err
    assert "expert width" in stdout and "routed-expert parameters" in stdout and "zero padding 0" in stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.moe_intermediate_size == 32 and model.model.layers[0].mlp.experts.down_proj.shape == (8, 64, 32)
    out = tmp_path / "heapr"
    code, stdout, err = _run(capsys, "prune", micro_path, "--granularity", "channel", "--method", "heapr", "--allocation", "buckets",
                             "--ratio", "0.5", "--compensate", "--calib", calib_path, "--out", out, *FAST)
    assert code == 0, err
    assert "compensation" in stdout and "stored in width buckets" in stdout and (out / "modeling_moe_fx.py").is_file()
    record = json.loads((out / "moe_fx.json").read_text())
    widths = record["channel_plan"]["kept_widths"]
    assert len({w for block in widths.values() for w in block}) > 1 and all(len(set(block)) <= 4 for block in widths.values())
    routed = 2 * 8 * 64  # channels of the source's routed experts: 2 layers of 8 experts of width 64
    assert record["expert_storage"]["routed_params_stored"] / record["expert_storage"]["routed_params_padded"] < 1
    assert sum(map(sum, widths.values())) <= routed // 2  # the checkpoint stores the budget, not the padded widths
    bucketed = load(out)
    assert type(bucketed.model.layers[0].mlp.experts).__name__ == "BucketedExperts"
    code, stdout, err = _run(capsys, "eval", out, "--data", valid_path, "--eval-seqs", "2", "--eval-seq-len", "64", "--quiet")
    assert code == 0, err
    again = tmp_path / "again"  # a bucketed checkpoint is a source like any other: loaded padded, rewritten, stored in buckets again
    code, stdout, err = _run(capsys, "prune", out, "--ratio", "0.25", "--calib", calib_path, "--out", again, *FAST)
    assert code == 0, err
    assert json.loads((again / "moe_fx.json").read_text())["expert_storage"]["routed_params_stored"] < record["expert_storage"]["routed_params_stored"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--granularity", "channel", "--allocation", "global"], "--allocation global is for experts"),
        (["--method", "fisher"], "--method fisher scores channels"),
        (["--granularity", "channel", "--method", "reap"], "--method reap scores experts"),
        (["--granularity", "channel", "--merge"], "without --merge"),
        (["--expert-ratio", "0.25"], "--expert-ratio is for --granularity channel"),
    ],
)
def test_channel_options_are_checked_first(extra, message, capsys, micro_path, calib_path, tmp_path):
    code, _, err = _run(capsys, "prune", micro_path, "--ratio", "0.5", "--calib", calib_path, "--out", tmp_path / "o", *extra, *FAST)
    assert code == 2 and message in err and not (tmp_path / "o").exists()


def test_prune_experts_then_channels(capsys, micro_path, calib_path, tmp_path):
    out = tmp_path / "both"
    code, stdout, err = _run(capsys, "prune", micro_path, "--granularity", "channel", "--expert-ratio", "0.25", "--ratio", "0.5",
                             "--calib", calib_path, "--out", out, *FAST)
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_experts == 6 and model.config.moe_intermediate_size == 32
    assert [p["name"] for p in json.loads((out / "moe_fx.json").read_text())["passes"]] == [
        "calibrate", "score", "drop_experts", "score", "prune_channels"]


def test_prune_with_compiled_calibration(capsys, micro_path, calib_path, tmp_path):
    """--compiled-calibration records the statistics inside the compiled graph: REAP scores agree with the hooks' (up
    to Inductor's arithmetic, which may flip a near-tie route), and bad combinations fail before any work."""
    runs = {}
    for name, extra in (("hooks", []), ("compiled", ["--compiled-calibration"])):
        out = tmp_path / name
        code, _, err = _run(capsys, "prune", micro_path, "--method", "reap", "--ratio", "0.25", "--calib", calib_path, "--no-eval",
                            "--out", out, *FAST, *extra)
        assert code == 0, err
        runs[name] = json.loads((out / "moe_fx.json").read_text())
    for block, expected in runs["hooks"]["scores"]["per_block"].items():
        assert runs["compiled"]["scores"]["per_block"][block] == pytest.approx(expected, rel=0.02)
    calibrate = next(p for p in runs["compiled"]["passes"] if p["name"] == "calibrate")
    assert calibrate["config"]["compiled"] is True
    code, _, err = _run(capsys, "prune", micro_path, "--method", "merge-reap", "--ratio", "0.25", "--calib", calib_path,
                        "--out", tmp_path / "merge", "--compiled-calibration", *FAST)
    assert code == 2 and "--compiled-calibration" in err and "samples" in err and not (tmp_path / "merge").exists()


def test_out_of_memory_is_one_line_naming_the_fix(capsys, micro_path, calib_path, tmp_path, monkeypatch):
    """A device running out of memory during calibration ends the command with one line: the batch and the options
    that lower the need, exit status 2, no output directory."""
    import torch

    from moe_fx.calibrate import hooks

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(hooks.BlockProbe, "observe", no_memory)
    code, _, err = _run(capsys, "prune", micro_path, "--ratio", "0.25", "--calib", calib_path, "--calib-tokens", "2048", "--seq-len", "128",
                        "--batch-size", "4", "--no-eval", "--quiet", "--device", "cpu", "--out", tmp_path / "oom")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "calibration ran out of memory on cpu with a batch of 4 x 128 tokens" in lines[0]
    assert "--batch-size" in lines[0] and "--stream on" in lines[0] and not (tmp_path / "oom").exists()
