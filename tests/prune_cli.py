"""What the tests of ``moe-fx prune``'s presets and family limits share: a small, fast prune command line and the
passes a finished run recorded."""

from __future__ import annotations

import json
from pathlib import Path

FAST_EEP = ["--eep-generations", "1", "--eep-population", "2", "--fitness-tokens", "512"]
"""EEP options for a search of seconds on a tiny model."""


def prune_argv(source: Path, calib_path: Path, out: Path, *extra: str) -> list[str]:
    """``moe-fx prune`` of ``source`` at 25% on 2,048 calibration tokens, on the CPU, without evaluation."""
    return ["prune", str(source), "--ratio", "0.25", "--calib", str(calib_path), "--calib-tokens", "2048", "--seq-len", "64",
            "--batch-size", "2", "--compensate-samples", "512", "--no-eval", "--device", "cpu", "--quiet", "--out", str(out), *extra]


def passes_run(out: Path) -> list[str]:
    """The names of the passes the run that wrote ``out`` recorded, in order."""
    return [p["name"] for p in json.loads((out / "moe_fx.json").read_text())["passes"]]
