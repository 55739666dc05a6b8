"""Calibration across 2 processes (torchrun, gloo on CPU) gives the single-process result."""

from __future__ import annotations

import json
import subprocess
import sys

FAST = ["--calib-tokens", "8192", "--seq-len", "128", "--no-eval", "--quiet"]


def _prune(micro_path, calib_path, out, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "moe_fx", "prune", str(micro_path), "--calib", str(calib_path), "--out", str(out), *FAST, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_two_processes_give_the_same_scores_and_plan(micro_path, calib_path, tmp_path):
    one = _prune(micro_path, calib_path, tmp_path / "one", "--method", "reap", "--ratio", "0.25")
    two = _prune(micro_path, calib_path, tmp_path / "two", "--method", "reap", "--ratio", "0.25", "--nproc", "2")
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    a, b = (json.loads((tmp_path / d / "moe_fx.json").read_text()) for d in ("one", "two"))
    assert b["world_size"] == 2 and a["world_size"] == 1
    assert a["plan"] == b["plan"]
    assert a["calibration"]["tokens"] == b["calibration"]["tokens"]
    for path, scores in a["scores"]["per_block"].items():
        for x, y in zip(scores, b["scores"]["per_block"][path], strict=True):
            assert abs(x - y) <= 1e-6 * max(abs(x), 1e-12), (path, x, y)


def test_sampling_methods_merge_the_ranks_samples(micro_path, calib_path, tmp_path):
    """NAEE and compensation read token reservoirs: merged across ranks, the run completes and is sound."""
    run = _prune(micro_path, calib_path, tmp_path / "naee", "--method", "naee", "--ratio", "0.25", "--compensate", "--compensate-samples", "512", "--nproc", "2")
    assert run.returncode == 0, run.stderr[-2000:]
    record = json.loads((tmp_path / "naee" / "moe_fx.json").read_text())
    assert all(len(v) == 6 for v in record["plan"]["kept_experts"].values())
    report = record["passes"][-1]["report"]
    assert report["mean_error_after"] < report["mean_error_before"]
    assert all(b["tokens"] == 512 for b in report["blocks"].values())  # the merged sample is full


def test_an_error_on_the_ranks_stops_the_run(micro_path, calib_path, tmp_path):
    run = _prune(micro_path, calib_path, tmp_path / "bad", "--method", "reap", "--keep", "1", "--nproc", "2")
    assert run.returncode != 0 and "fewer than top-k" in run.stderr
    assert not (tmp_path / "bad").exists()


def test_eep_spreads_candidates_over_the_ranks(micro_path, calib_path, tmp_path):
    """Each rank measures part of every generation; the shared fitness values give the single-process search."""
    eep = ["--method", "eep", "--ratio", "0.25", "--eep-population", "4", "--eep-generations", "2", "--fitness-tokens", "1024"]
    one = _prune(micro_path, calib_path, tmp_path / "one", *eep)
    two = _prune(micro_path, calib_path, tmp_path / "two", *eep, "--nproc", "2")
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    ra, rb = (json.loads((tmp_path / d / "moe_fx.json").read_text()) for d in ("one", "two"))
    assert ra["plan"] == rb["plan"]
    a, b = ra["search"], rb["search"]
    assert a["evaluations"] == b["evaluations"] > 4
    for x, y in zip(a["history"], b["history"], strict=True):
        assert abs(x - y) <= 1e-6 * abs(x)


def test_streaming_across_two_processes(micro_path, calib_path, tmp_path):
    """Each rank streams its share of the windows through every layer; the reduced statistics give the
    single-process streamed plan and scores, and rank 0 alone writes the checkpoint."""
    args = ["--method", "reap", "--ratio", "0.25", "--stream", "on"]
    merged = _prune(micro_path, calib_path, tmp_path / "comp", *args, "--compensate", "--compensate-samples", "512", "--nproc", "2")
    assert merged.returncode == 0, merged.stderr[-2000:]  # the layer's input reservoirs are merged across ranks too
    report = json.loads((tmp_path / "comp" / "moe_fx.json").read_text())["passes"][-1]["report"]
    assert all(b["tokens"] == 512 for b in report["blocks"].values()) and report["mean_error_after"] < report["mean_error_before"]
    one = _prune(micro_path, calib_path, tmp_path / "one", *args)
    two = _prune(micro_path, calib_path, tmp_path / "two", *args, "--nproc", "2")
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    a, b = (json.loads((tmp_path / d / "moe_fx.json").read_text()) for d in ("one", "two"))
    assert b["world_size"] == 2 and b["streaming"]["layers"] == 2
    assert a["plan"] == b["plan"] and a["calibration"]["tokens"] == b["calibration"]["tokens"]
    for path, scores in a["scores"]["per_block"].items():
        for x, y in zip(scores, b["scores"]["per_block"][path], strict=True):
            assert abs(x - y) <= 1e-6 * max(abs(x), 1e-12), (path, x, y)
    files = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "one").iterdir()) and not list(tmp_path.glob(".two*"))
