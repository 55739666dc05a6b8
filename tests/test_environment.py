"""Versions of the stack: ``moe-fx --version`` and the one-line warning for a transformers outside the tested range."""

from __future__ import annotations

import subprocess
import sys

import pytest
import transformers

from moe_fx import cli, environment


def test_version_names_the_stack_and_the_tested_range():
    proc = subprocess.run([sys.executable, "-m", "moe_fx", "--version"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0
    line = proc.stdout.strip()
    assert "\n" not in line and line.startswith("moe-fx ")
    assert f"transformers {transformers.__version__}" in line and "torch " in line and "onnxruntime " in line
    low, high = environment.TESTED_TRANSFORMERS
    assert f"tested with transformers {low} to {high}" in line


def test_the_installed_transformers_is_in_the_tested_range():
    """CI runs the pinned and the newest release: both must be inside the declared range (else bump it)."""
    assert environment.untested_transformers() is None, environment.untested_transformers()


@pytest.mark.parametrize("installed, warns", [("5.22.2", True), ("5.23.0", False), ("5.25.0", False), ("5.26.0.dev0", True), ("6.0.0", True)])
def test_warning_outside_the_tested_range(installed, warns, monkeypatch, capsys, micro_path):
    monkeypatch.setattr(environment, "installed_version", lambda name: installed if name == "transformers" else None)
    assert (environment.untested_transformers() is not None) == warns
    assert cli.main(["inspect", str(micro_path), "--device", "cpu"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "outside the versions" in line]
    assert len(err) == (1 if warns else 0)
    if warns:
        low, high = environment.TESTED_TRANSFORMERS
        assert installed in err[0] and f"{low} to {high}" in err[0]
