"""Every script in examples/ runs on the shipped micro model and prints what it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ASSETS, REPO

EXAMPLES = {
    "prune.py": ["identical logits: True"],
    "build_pruned.py": ["EEP 25% experts + comp.", "+ 10 distillation steps", "saved to"],
    "choose_split.py": ["<- kept", "valid NLL", "saved to"],
    "compile.py": ["max |logit diff| vs eager"],
    "export_onnx.py": ["greedy tokens identical", "static decode graph on cpu: the same 12 tokens"],
    "stream.py": ["streamed 2 layers", "checkpoint in"],
    "distill_streamed.py": ["distilled on the cached top-64 teacher", "saved to"],
    "quantize.py": ["MB int4 (", "mean NLL int4 checkpoint (transformers)", "mean NLL int4 in memory (moe-fx kernels)", "checkpoint in"],
}


def test_every_example_is_tested():
    assert {p.name for p in (REPO / "examples").glob("*.py")} == set(EXAMPLES)


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_example_runs(script, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "examples" / script), str(ASSETS / "qwen3moe-micro"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for expected in EXAMPLES[script]:
        assert expected in proc.stdout, proc.stdout
    if script != "compile.py":
        assert (Path(tmp_path / "out") / "config.json").is_file()
