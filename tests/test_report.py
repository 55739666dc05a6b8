"""Reports and sweeps: report.md / report.json / plots beside every pruned checkpoint, `moe-fx report`,
`moe-fx sweep` (paired with `moe-fx prune`), `moe-fx eval --tasks`, and their bad inputs."""

from __future__ import annotations

import json

import pytest
from conftest import ASSETS
from transformers import AutoModelForCausalLM

from moe_fx.cli import main

FAST = ["--calib-tokens", "4096", "--seq-len", "128", "--eval-seqs", "2", "--eval-seq-len", "128", "--quiet"]
TASKS = ["--task-data", str(ASSETS / "eval"), "--task-limit", "6"]
PNG = b"\x89PNG\r\n\x1a\n"


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _is_png(path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG


def test_prune_writes_a_report(capsys, micro_path, calib_path, valid_path, tmp_path):
    out = tmp_path / "pruned"
    code, stdout, err = _run(capsys, "prune", micro_path, "--ratio", "0.25", "--calib", calib_path, "--eval-data", valid_path,
                             "--eval-tasks", "piqa,copa,blimp", *TASKS, "--out", out, *FAST)
    assert code == 0, err
    assert "zero-shot accuracy" in stdout and "piqa" in stdout
    record = json.loads((out / "moe_fx.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert [r["kept_experts"] for r in report["layers"]] == list(record["plan"]["kept_experts"].values())
    assert [(r["experts_before"], r["experts_after"]) for r in report["layers"]] == [(8, 6), (8, 6)]
    assert report["size"]["params_after"] < report["size"]["params_before"] and report["size"]["disk_after"] > 0
    assert report["nll"]["mean"]["nll"]["delta"] == pytest.approx(record["eval_after"]["mean"]["nll"] - record["eval_before"]["mean"]["nll"])
    assert set(report["tasks"]) == {"piqa", "copa", "blimp"} and report["tasks"]["blimp"]["n"] == 18
    assert report["tasks"]["piqa"]["acc"]["after"] == record["tasks_after"]["piqa"]["acc"]
    assert set(report["plots"]) == {"importance", "scores", "domains", "tasks"} and not report["plot_errors"]
    for f in report["plots"].values():
        assert _is_png(out / f)
    md = (out / "report.md").read_text()
    for section in ("## Size", "## Held-out NLL", "## Zero-shot tasks", "## Per layer", "## Run", "![importance](plots/importance.png)"):
        assert section in md
    assert str(out) in md or out.name in md

    (out / "report.md").unlink()
    code, stdout, _ = _run(capsys, "report", out)
    assert code == 0 and (out / "report.md").is_file() and "## Per layer" in stdout
    code, _, err = _run(capsys, "report", micro_path)
    assert code == 2 and "no moe_fx.json" in err


def test_channel_report_draws_kept_widths(micro_path, calib_path, tmp_path, capsys):
    out = tmp_path / "chan"
    code, _, err = _run(capsys, "prune", micro_path, "--granularity", "channel", "--method", "activation", "--allocation", "expert",
                        "--multiple", "8", "--ratio", "0.5", "--calib", calib_path, "--no-eval", "--out", out, *FAST)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert "widths" in report["plots"] and _is_png(out / report["plots"]["widths"])
    assert all(r["kept_widths"] and max(r["kept_widths"]) <= r["width_after"] < r["width_before"] for r in report["layers"])


def test_sweep_is_paired_with_prune(capsys, micro_path, calib_path, valid_path, tmp_path):
    sweep = tmp_path / "sweep"
    code, stdout, err = _run(capsys, "sweep", micro_path, "--methods", "random,reap", "--ratios", "0.25,0.5", "--calib", calib_path,
                             "--eval-data", valid_path, "--eval-tasks", "copa", *TASKS, "--save", "--out", sweep, *FAST)
    assert code == 0, err
    assert "moe-fx sweep" in stdout and "unpruned" in stdout
    result = json.loads((sweep / "sweep.json").read_text())
    assert [(p["method"], p["ratio"]) for p in result["points"]] == [("random", 0.25), ("random", 0.5), ("reap", 0.25), ("reap", 0.5)]
    assert all(p["worst_delta"] >= p["nll_delta"] for p in result["points"])
    assert set(result["plots"]) == {"nll_delta", "worst_delta", "task_copa"}
    for f in result["plots"].values():
        assert _is_png(sweep / f)
    # the sweep's reap 25% point is the prune `moe-fx prune --method reap --ratio 0.25` makes from the same options
    single = tmp_path / "single"
    code, _, err = _run(capsys, "prune", micro_path, "--method", "reap", "--ratio", "0.25", "--calib", calib_path, "--eval-data", valid_path,
                        "--out", single, *FAST)
    assert code == 0, err
    record = json.loads((single / "moe_fx.json").read_text())
    point = result["points"][2]
    assert point["nll_mean"] == pytest.approx(record["eval_after"]["mean"]["nll"], abs=1e-6)
    saved = json.loads((sweep / "checkpoints" / "reap-25" / "moe_fx.json").read_text())
    assert saved["plan"] == record["plan"]
    assert AutoModelForCausalLM.from_pretrained(sweep / "checkpoints" / "reap-50").config.num_experts == 4


@pytest.mark.parametrize("argv, message", [
    (["--methods", "eep"], "eep searches with its own fitness split"),
    (["--methods", "reap", "--ratios", "0.25,1.5"], "every ratio must be in (0, 1)"),
    (["--methods", "reap", "--ratios", "a"], "comma list of numbers"),
    (["--methods", "nope"], "nope"),
    (["--methods", "reap", "--ratios", "0.9"], "fewer than top-k"),
])
def test_sweep_bad_input(capsys, micro_path, calib_path, tmp_path, argv, message):
    out = tmp_path / "s"
    code, _, err = _run(capsys, "sweep", micro_path, *argv, "--calib", calib_path, "--out", out, *FAST)
    assert code == 2 and message in err and not out.exists()


def test_eval_tasks_compare_and_errors(capsys, micro_path, tmp_path):
    js = tmp_path / "e.json"
    code, stdout, err = _run(capsys, "eval", micro_path, micro_path, "--tasks", "piqa,lambada_openai", "--task-data", ASSETS / "eval",
                             "--limit", "4", "--json", js, "--no-cache", "--quiet")
    assert code == 0, err
    assert "zero-shot accuracy (%), first 4 items per task" in stdout and "delta qwen3moe-micro" in stdout
    results = json.loads(js.read_text())[str(micro_path)]
    assert results["tasks"]["piqa"]["n"] == 4 and "ppl" in results["tasks"]["lambada_openai"] and "nll" not in results
    code, _, err = _run(capsys, "eval", micro_path, "--quiet")
    assert code == 2 and "nothing to evaluate" in err
    code, _, err = _run(capsys, "eval", micro_path, "--tasks", "mmlu", "--task-data", ASSETS / "eval")
    assert code == 2 and "unknown task 'mmlu'" in err
    code, _, err = _run(capsys, "eval", micro_path, "--tasks", "piqa", "--task-data", "")
    assert code == 2 and "--task-data" in err


def test_streamed_prune_refuses_tasks(capsys, micro_path, calib_path, tmp_path):
    code, _, err = _run(capsys, "prune", micro_path, "--ratio", "0.25", "--calib", calib_path, "--stream", "on", "--eval-tasks", "piqa",
                        *TASKS, "--out", tmp_path / "o", *FAST)
    assert code == 2 and "--eval-tasks needs the whole model in memory" in err


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(micro_path, calib_path, valid_path, tmp_path, monkeypatch):
    import moe_fx.run.sweep as sweep
    from moe_fx.errors import BadOptionError
    from moe_fx.evaluate.nll import build_eval_set
    from moe_fx.evaluate.report.sweep_report import write_sweep
    from moe_fx.formats.loading import load_model, load_tokenizer
    from moe_fx.passes import Calibrate

    real = sweep.prune_passes

    def flaky(scorer, spec, **kw):
        if scorer.name == "frequency":
            raise BadOptionError("frequency cannot run on this model")
        return real(scorer, spec, **kw)

    monkeypatch.setattr(sweep, "prune_passes", flaky)
    model, tok = load_model(micro_path), load_tokenizer(micro_path)
    seen = []
    result = sweep.run_sweep(model, methods=["frequency", "random"], ratios=[0.25], show_progress=False,
                             calibration=Calibrate(calib_path, tokenizer=tok, max_tokens=2048, seq_len=64, show_progress=False),
                             eval_set=build_eval_set(valid_path, tok, seq_len=64, seqs_per_domain=1),
                             on_point=lambda point, pruned: seen.append(pruned is None))
    assert result.points[0] == {"method": "frequency", "ratio": 0.25, "error": "frequency cannot run on this model"}
    assert result.points[1]["method"] == "random" and "nll_delta" in result.points[1] and seen == [True, False]
    md = write_sweep(tmp_path, result, model="micro", notes=[]).read_text()
    assert "| frequency | 25% | failed | frequency cannot run on this model |" in md and _is_png(tmp_path / "plots" / "nll_delta.png")


@pytest.mark.parametrize("stored, label", [({"quantization": {"scheme": "int4-group"}}, "int4-group"),
                                           ({"expert_format": {"format": "mxfp4"}}, "mxfp4")])
def test_report_names_the_format_of_the_saved_checkpoint(tmp_path, stored, label):
    """The table of the checkpoint read back from disk names how it is stored: a scheme written after the prune, or
    the MXFP4 experts a pruned GPT-OSS keeps (its record has no ``quantization`` entry)."""
    from moe_fx.evaluate.report.report import render_markdown, summarize

    evals = {d: {"nll": nll, "ppl": 2.0} for d, nll in (("web", 4.0), ("mean", 4.0))}
    record = {"eval_before": evals, "eval_after": evals, "eval_saved": {d: {"nll": 4.5, "ppl": 2.0} for d in evals}, **stored}
    text = render_markdown(summarize(record, tmp_path), {}, {})
    assert f"quantized ({label}); read back from disk" in text and "| mean | 4.0000 | 4.5000 | +0.5000 |" in text
