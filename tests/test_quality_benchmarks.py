"""The quality benchmark scripts run end to end on the trained micro model (tiny budgets, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from moe_fx import state_of
from moe_fx.formats.loading import load_model

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TINY_BUDGET = ["--calib-tokens", "4096", "--holdout-tokens", "1024", "--seq-len", "64", "--eval-seqs", "1", "--batch-size", "4", "--device", "cpu"]


def _run(script: str, micro_path: Path, calib_path: Path, out: Path, *extra: str) -> dict:
    proc = subprocess.run([sys.executable, script, "--model", str(micro_path), "--calib", str(calib_path), "--valid", str(calib_path),
                           *TINY_BUDGET, "--out", str(out), *extra], cwd=BENCH, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


def test_distill_recovery_reports_reap_rows_generation_and_larger_steps(micro_path, calib_path, tmp_path) -> None:
    result = _run("distill_recovery.py", micro_path, calib_path, tmp_path / "d.json", "--pipelines", "reap 25%", "reap 25% + comp",
                  "--steps", "2", "--distill-batch-size", "8", "--lrs", "1e-3", "--generate", "4")
    runs = {r["pipeline"]: r for r in result["runs"]}
    assert runs["reap 25%"]["distilled"] == {} and runs["reap 25%"]["chosen_lr"] is None  # a reference: one-shot only
    distilled = runs["reap 25% + comp"]["distilled"]["0.001"]
    assert distilled["generation"]["prompts"] == 4 and 0 <= distilled["generation"]["token_match"] <= 1
    assert result["options"]["distill_batch_size"] == 8


def test_expert_substitution_script_runs(micro_path, calib_path, tmp_path) -> None:
    result = _run("expert_substitution.py", micro_path, calib_path, tmp_path / "s.json", "--ratios", "0.25")
    rows = result["rows"]
    assert len(rows) == 6 and {r["rewrite"] for r in rows} == {"drop (re-route)", "substitute (MoNE)"}
    assert all(r["delta_nll"] == r["delta_nll"] for r in rows)  # finite, not NaN


def test_train_tiny_moe_tokenizes_trains_and_saves_a_loadable_model(calib_path, tmp_path, monkeypatch) -> None:
    """The trainer of other families' reference models: a few steps of each family on the CPU give a checkpoint
    moe-fx loads and traces, with its report (in process: three interpreters' start-up was most of its time)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import train_tiny_moe

    tokens = tmp_path / "tokens.pt"
    train_tiny_moe.tokenize(calib_path, BENCH.parent / "examples/assets/qwen3moe-micro/tokenizer.json", tokens)
    for family in ("qwen2_moe", "mixtral", "olmoe", "deepseek_v3"):
        out = tmp_path / family
        monkeypatch.setattr(sys, "argv", ["train_tiny_moe.py", "--tokens", str(tokens), "--family", family, "--size", "micro",
                                          "--steps", "2", "--batch", "2", "--seq", "32", "--out", str(out)])
        train_tiny_moe.main()
        report = json.loads((out / "report.json").read_text())
        assert report["family"] == family and report["train_tokens"] == 2 * 2 * 32
        model = load_model(out)
        spec = state_of(model).spec
        assert spec.blocks and spec.blocks[0].top_k == {"qwen2_moe": 4, "mixtral": 2, "olmoe": 8, "deepseek_v3": 4}[family]
        if family == "deepseek_v3":  # balanced by the routers' correction bias, which the two steps moved
            assert all(b.abs().max() > 0 for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))


def test_preset_vs_reap_records_refusals_and_the_kept_split(monkeypatch, tmp_path) -> None:
    """The preset-against-REAP table: a budget the CLI refuses is a row saying so (not an aborted table), the preset's
    row names the split it kept with each candidate's fitness, and ratios are against REAP's loss at that budget."""
    monkeypatch.syspath_prepend(str(BENCH))
    import preset_vs_reap

    def fake_prune(model, options, out):  # what the CLI records, without running it (the CLI's refusals: tests/test_presets.py)
        ratio = float(options[options.index("--ratio") + 1])
        if ratio == 0.05:
            raise SystemExit("moe-fx prune ... failed:\nmoe-fx prune: error: --ratio 0.05 drops no expert (of 8 a block, rounded)")
        preset = "--preset" in options
        passes = [{"name": "choose_recipe", "report": {"chosen": "experts 0, channels 0.25", "fitness": {"experts 0, channels 0.25": 4.1}}}] if preset else []
        return {"delta_nll": 0.1 if preset else 0.2, "passes": passes, "eval_before": {"mean": {"nll": 4.0}}, "wall_seconds": 1.0, "cli": {},
                "experts_before": {"b": 8}, "experts_after": {"b": 8 if preset else 6}, "widths_before": {"b": 64}, "widths_after": {"b": 48 if preset else 64}}

    monkeypatch.setattr(preset_vs_reap, "cli_prune", fake_prune)
    monkeypatch.setattr(sys, "argv", ["preset_vs_reap.py", "--model", "m", "--calib", "c", "--valid", "v", "--recipes", "reap", "best-oneshot-params",
                                      "--ratios", "0.05", "0.25", "--out", str(tmp_path / "pvr.json")])
    preset_vs_reap.main()
    rows = {(r["ratio"], r["recipe"]): r for r in json.loads((tmp_path / "pvr.json").read_text())["rows"]}
    assert rows[0.05, "reap"]["refused"].endswith("drops no expert (of 8 a block, rounded)") and "x_reap" not in rows[0.05, "best-oneshot-params"]
    preset = rows[0.25, "best-oneshot-params"]
    assert preset["split_kept"] == "experts 0, channels 0.25" and preset["split_fitness"] == {"experts 0, channels 0.25": 4.1}
    assert preset["x_reap"] == 0.5 and preset["routed_removed"] == 0.25 and rows[0.25, "reap"]["routed_removed"] == 0.25


def test_bucket_speed_measures_the_three_layouts(tmp_path) -> None:
    """``bucket_speed.py`` on tiny synthetic shapes: one width, per-expert widths padded, the same in buckets (the
    bucketed weights smaller than the padded ones, equal to the budget within the widths' rounding)."""
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, "bucket_speed.py", "--model", "qwen3-30b-shapes", "--tiny", "--device", "cpu", "--threads", "1",
                           "--batch", "2", "--seq", "16", "--prompt", "4", "--decode-steps", "2", "--repeats", "1", "--out", str(out)],
                          cwd=BENCH, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"uniform", "padded", "buckets"} and results["buckets"]["weight_bytes"] < results["padded"]["weight_bytes"]
    assert all(r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 for r in results.values())
