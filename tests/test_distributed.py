"""Calibration across 2 processes (torchrun, gloo on CPU) gives the single-process result.

Single-process runs call the command line's ``main`` in this process, and so do most ``--nproc 2`` runs (``main``
relaunches itself under torchrun, whose workers are real processes): an interpreter start with its imports is most
of a tiny run. The first test runs ``python -m moe_fx prune --nproc 2`` as a subprocess end to end."""

from __future__ import annotations

import json
import subprocess
import sys

from moe_fx.cli import main

FAST = ["--calib-tokens", "8192", "--seq-len", "128", "--no-eval", "--quiet"]


def _argv(micro_path, calib_path, out, *extra) -> list[str]:
    return ["prune", str(micro_path), "--calib", str(calib_path), "--out", str(out), *FAST, *extra]


def _prune(micro_path, calib_path, out, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "moe_fx", *_argv(micro_path, calib_path, out, *extra)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _prune_here(micro_path, calib_path, out, *extra) -> int:
    """The same command through ``moe_fx.cli.main`` in this process; its exit code (torchrun's with ``--nproc``)."""
    return main(_argv(micro_path, calib_path, out, *extra))


def test_two_processes_give_the_same_scores_and_plan(micro_path, calib_path, tmp_path):
    assert _prune_here(micro_path, calib_path, tmp_path / "one", "--method", "reap", "--ratio", "0.25") == 0
    two = _prune(micro_path, calib_path, tmp_path / "two", "--method", "reap", "--ratio", "0.25", "--nproc", "2")
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = (json.loads((tmp_path / d / "moe_fx.json").read_text()) for d in ("one", "two"))
    assert b["world_size"] == 2 and a["world_size"] == 1
    assert a["plan"] == b["plan"]
    assert a["calibration"]["tokens"] == b["calibration"]["tokens"]
    for path, scores in a["scores"]["per_block"].items():
        for x, y in zip(scores, b["scores"]["per_block"][path], strict=True):
            assert abs(x - y) <= 1e-6 * max(abs(x), 1e-12), (path, x, y)


def test_sampling_methods_merge_the_ranks_samples(micro_path, calib_path, tmp_path, capfd):
    """NAEE and compensation read token reservoirs: merged across ranks, the run completes and is sound."""
    code = _prune_here(micro_path, calib_path, tmp_path / "naee", "--method", "naee", "--ratio", "0.25", "--compensate",
                       "--compensate-samples", "512", "--nproc", "2")
    assert code == 0, capfd.readouterr().err[-2000:]
    record = json.loads((tmp_path / "naee" / "moe_fx.json").read_text())
    assert all(len(v) == 6 for v in record["plan"]["kept_experts"].values())
    report = record["passes"][-1]["report"]
    assert report["mean_error_after"] < report["mean_error_before"]
    assert all(b["tokens"] == 512 for b in report["blocks"].values())  # the merged sample is full


def test_an_error_on_the_ranks_stops_the_run(micro_path, calib_path, tmp_path, capfd):
    capfd.readouterr()
    code = _prune_here(micro_path, calib_path, tmp_path / "bad", "--method", "reap", "--keep", "1", "--nproc", "2")
    assert code != 0 and "fewer than top-k" in capfd.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_eep_spreads_candidates_over_the_ranks(micro_path, calib_path, tmp_path, capfd):
    """Each rank measures part of every generation; the shared fitness values give the single-process search."""
    eep = ["--method", "eep", "--ratio", "0.25", "--eep-population", "4", "--eep-generations", "2", "--fitness-tokens", "1024"]
    assert _prune_here(micro_path, calib_path, tmp_path / "one", *eep) == 0
    code = _prune_here(micro_path, calib_path, tmp_path / "two", *eep, "--nproc", "2")
    assert code == 0, capfd.readouterr().err[-2000:]
    ra, rb = (json.loads((tmp_path / d / "moe_fx.json").read_text()) for d in ("one", "two"))
    assert ra["plan"] == rb["plan"]
    a, b = ra["search"], rb["search"]
    assert a["evaluations"] == b["evaluations"] > 4
    for x, y in zip(a["history"], b["history"], strict=True):
        assert abs(x - y) <= 1e-6 * abs(x)


def test_streaming_across_two_processes(micro_path, calib_path, tmp_path, capfd):
    """Each rank streams its share of the windows through every layer; the reduced statistics give the
    single-process streamed plan and scores, the layer's input reservoirs (compensation) are merged across ranks
    too, and rank 0 alone writes the checkpoint."""
    args = ["--method", "reap", "--ratio", "0.25", "--stream", "on", "--compensate", "--compensate-samples", "512"]
    assert _prune_here(micro_path, calib_path, tmp_path / "one", *args) == 0
    code = _prune_here(micro_path, calib_path, tmp_path / "two", *args, "--nproc", "2")
    assert code == 0, capfd.readouterr().err[-2000:]
    a, b = (json.loads((tmp_path / d / "moe_fx.json").read_text()) for d in ("one", "two"))
    report = b["passes"][-1]["report"]
    assert all(block["tokens"] == 512 for block in report["blocks"].values()) and report["mean_error_after"] < report["mean_error_before"]
    assert b["world_size"] == 2 and b["streaming"]["layers"] == 2
    assert a["plan"] == b["plan"] and a["calibration"]["tokens"] == b["calibration"]["tokens"]
    for path, scores in a["scores"]["per_block"].items():
        for x, y in zip(scores, b["scores"]["per_block"][path], strict=True):
            assert abs(x - y) <= 1e-6 * max(abs(x), 1e-12), (path, x, y)
    files = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "one").iterdir()) and not list(tmp_path.glob(".two*"))
