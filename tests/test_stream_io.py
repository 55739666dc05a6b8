"""The streamed run's disk work off the layer loop: the next layer read ahead, the last layer written behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_fx.formats.partial import PartialCheckpoint, ShardWriter
from moe_fx.formats.read_ahead import ReadAhead, _merged, tensor_ranges
from moe_fx.passes import Calibrate, DropExperts, Score
from moe_fx.run.streaming import stream_prune


def test_tensor_ranges_hold_each_tensors_bytes(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.tensor([7, 8], dtype=torch.int64),
               "c": torch.ones(4, dtype=torch.bfloat16)}
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    data = path.read_bytes()
    ranges = tensor_ranges(path)
    assert sorted(ranges) == ["a", "b", "c"]
    for key, (start, end) in ranges.items():
        assert data[start:end] == tensors[key].view(torch.uint8).numpy().tobytes()
    reader = ReadAhead([path])
    reader.start(["a", "c"])
    reader.close()


def test_merged_joins_touching_ranges():
    assert _merged([(10, 20), (0, 10), (30, 40), (35, 50)]) == [(0, 20), (30, 50)]


def test_a_failed_write_is_raised_and_close_waits_for_the_one_in_flight(tmp_path, monkeypatch):
    partial = PartialCheckpoint(tmp_path / "out", "run")
    writer = ShardWriter(partial)
    record = {"seconds": {"write": 0.0}}
    writer.submit(0, "s0.safetensors", {"w": torch.zeros(3)}, record)
    writer.drain()
    assert (partial.dir / "s0.safetensors").is_file() and record["seconds"]["write_behind"] >= 0
    assert json.loads((partial.dir / "progress.json").read_text())["layers"].keys() == {"0"}

    def full_disk(self, name, tensors):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PartialCheckpoint, "write_shard", full_disk)
    writer.submit(1, "s1.safetensors", {"w": torch.zeros(3)}, {"seconds": {}})
    with pytest.raises(OSError, match="No space"):
        writer.drain()
    writer.close()
    assert partial.resumed == 1 and not (partial.dir / "s1.safetensors").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/test_gpu.sh)")
def test_gpu_tensors_are_copied_after_the_work_that_makes_them(tmp_path):
    partial = PartialCheckpoint(tmp_path / "out", "run")
    writer = ShardWriter(partial)
    x = torch.randn(4096, 4096, device="cuda")
    y = x @ x  # still running on the main stream when submitted: the worker's copy waits for it
    writer.submit(0, "s0.safetensors", {"y": y[:, ::2]}, {"seconds": {}})
    del y
    writer.drain()
    writer.close()
    assert torch.equal(load_file(partial.dir / "s0.safetensors")["y"], (x @ x)[:, ::2].cpu())


def test_each_layer_reads_the_next_one_ahead(micro_path, tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(ReadAhead, "start", lambda self, keys: started.append(sorted({k.split(".")[2] for k in keys})))
    tokens = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    passes = [Calibrate(tokens, batch_size=2, show_progress=False), Score("reap"), DropExperts(ratio=0.5)]
    report = stream_prune(micro_path, tmp_path / "out", passes, show_progress=False, report=False)
    assert started == [[str(i)] for i in range(1, report.layers)]
    layers = json.loads((report.out / "moe_fx.json").read_text())["streaming"]["per_layer_seconds"]
    assert all("write_behind" in seconds for seconds in layers.values())


def test_stream_overlap_benchmark_runs_on_cpu(tmp_path):
    """``benchmarks/stream_overlap.py`` end to end at tiny shapes: its four variants stream the same checkpoint."""
    out = tmp_path / "overlap.json"
    argv = ["stream_overlap.py", "--device", "cpu", "--layers", "2", "--repeats", "1", "--work", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run([sys.executable, *argv], cwd=Path(__file__).resolve().parents[1] / "benchmarks", capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["in the loop", "read-ahead", "+ written behind, copied in the loop", "+ copied behind"]
    assert all(r["seconds_per_layer"] > 0 and r["mean_phases"]["forward"] > 0 for r in rows)
