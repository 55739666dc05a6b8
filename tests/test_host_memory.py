"""Memory plans made before loading: the CPU memory of sampled calibration statistics (what NAEE/SHAPE/merging
and compensation keep per block) and what distillation holds, counted without allocating, and refused up front
(before the model is loaded) when the machine cannot hold it."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

import moe_fx
import moe_fx.calibrate as calibrate
import moe_fx.formats.loading
from moe_fx import cli
from moe_fx.calibrate import InputObserver, ReapObserver, RoutingObserver, SampleObserver, check_host_memory
from moe_fx.errors import HostMemoryError
from moe_fx.rewrite.distill import training_memory

GIB = 2**30


@pytest.fixture(scope="module")
def qwen3_30b():
    """Qwen3-30B-A3B (48 blocks of 128 experts, hidden 2048, top-8) built on meta in bfloat16."""
    config = Qwen3MoeConfig(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                            num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                            vocab_size=151936)
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    return model


@pytest.fixture(scope="module")
def qwen3_30b_spec(qwen3_30b):
    return moe_fx.state_of(qwen3_30b).spec


def test_distillation_memory_plan(qwen3_30b, qwen3_30b_spec):
    """REAP 50% of Qwen3-30B-A3B in bf16: 16.0 B parameters stay; training the routed experts and routers holds a
    gradient and two AdamW moments (bf16, as torch keeps them) per kept routed parameter; the routers alone, 12.6 M."""
    routed, routers = 48 * 128 * 3 * 2048 * 768, 48 * 128 * 2048
    total = sum(p.numel() for p in qwen3_30b.parameters())
    plan = training_memory(qwen3_30b, qwen3_30b_spec, kept_fraction=0.5)
    assert plan == {"student": 2 * (total - routed // 2), "gradients": 2 * (routed // 2 + routers), "moments": 4 * (routed // 2 + routers), "teacher": 0}
    assert 118e9 < sum(plan.values()) < 121e9  # inside one H200 (139 GiB = 149 GB), before activations
    small = training_memory(qwen3_30b, qwen3_30b_spec, kept_fraction=0.5, train="routers", teacher_in_memory=True)
    assert small["gradients"] == 2 * routers and small["teacher"] == 2 * total
    # rank-16 adapters: per kept expert and matrix 16 x (out + in) float32 numbers (gate_up [1536, 2048], down [2048, 768]),
    # the routers in bf16, and one layer's effective experts (64 kept of 128) at a time
    adapters = training_memory(qwen3_30b, qwen3_30b_spec, kept_fraction=0.5, train="adapters", rank=16)
    factors = 48 * 64 * 16 * ((1536 + 2048) + (2048 + 768))
    assert adapters == {"student": plan["student"], "adapters": 4 * factors, "gradients": 4 * factors + 2 * routers,
                        "moments": 2 * (4 * factors + 2 * routers), "adapted_layer": 2 * 64 * 3 * 2048 * 768, "teacher": 0}
    assert sum(adapters.values()) < 0.6 * sum(plan.values())  # 65 GB: fits an H100 (80 GB) before activations


def test_sample_bytes_counted_without_allocating(qwen3_30b_spec):
    block = qwen3_30b_spec.blocks[0]
    n, e, h, k = 1024, 128, 2048, 8
    # logits [n,E] + every expert's output [n,E,H] + their input [n,H] + bias [E] + top-k index (int64) and weight [n,k] + the count
    assert SampleObserver(n).accumulator_bytes(block) == 4 * (n * e + n * e * h + n * h + e + n * k) + 8 * n * k + 8
    assert InputObserver(16384).accumulator_bytes(block) == 4 * (16384 * (2 * h + e + k) + e) + 8 * 16384 * k + 8
    assert SampleObserver().on_host and InputObserver().on_host and not ReapObserver().on_host


def test_whole_model_sample_refused_streamed_fits(qwen3_30b_spec):
    observers = [RoutingObserver(), SampleObserver(1024)]
    with pytest.raises(HostMemoryError) as err:
        check_host_memory(qwen3_30b_spec, observers, available=23 * GIB)
    message = str(err.value)
    assert "48.4 GiB" in message and "all 48 blocks" in message and "samples 1.0 GiB" in message
    assert "--stream on" in message and "--search-samples" in message and "\n" not in message
    check_host_memory(qwen3_30b_spec, observers, streamed=True, available=23 * GIB)  # one block: 1 GiB
    check_host_memory(qwen3_30b_spec, [RoutingObserver(), SampleObserver(256)], available=23 * GIB)  # 12 GiB
    check_host_memory(qwen3_30b_spec, [RoutingObserver(), ReapObserver()], available=1)  # running sums only: nothing to check


def test_streamed_block_too_large_names_the_sample_options(qwen3_30b_spec):
    with pytest.raises(HostMemoryError) as err:
        check_host_memory(qwen3_30b_spec, [SampleObserver(1024), InputObserver(16384)], streamed=True, available=GIB)
    message = str(err.value)
    assert "the block being streamed" in message and "--stream on" not in message and "--compensate-samples" in message


def _prune(micro_path: Path, calib_path: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", str(micro_path), "--method", "naee", "--ratio", "0.25", "--calib", str(calib_path), "--calib-tokens", "2048",
            "--seq-len", "128", "--no-eval", "--device", "cpu", "--quiet", "--out", str(out), *extra]


def test_cli_refuses_distillation_that_cannot_fit(micro_path, calib_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(calibrate, "host_memory_available", lambda: 2**20)
    monkeypatch.setattr(moe_fx.formats.loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the refusal"))
    out = tmp_path / "out"
    code = cli.main(["prune", str(micro_path), "--method", "reap", "--ratio", "0.25", "--calib", str(calib_path), "--distill-steps", "2",
                     "--no-eval", "--device", "cpu", "--quiet", "--out", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "distillation would hold" in lines[0] and "--distill-train routers needs" in lines[0], lines
    assert not out.exists()


def test_preset_best_trains_adapters_where_only_they_fit(micro_path, calib_path, tmp_path, capsys, monkeypatch):
    """With memory between the adapters' plan and the experts', ``--preset best`` says it trains adapters instead of
    refusing, before loading anything; an explicit ``--distill-train experts`` is refused, naming the adapters' need."""
    model = moe_fx.load(micro_path, dtype="float32")
    spec = moe_fx.state_of(model).spec
    need = {t: sum(training_memory(model, spec, kept_fraction=0.75, train=t, teacher_in_memory=True).values()) for t in ("experts", "adapters")}
    assert need["adapters"] < need["experts"]
    monkeypatch.setattr(calibrate, "host_memory_available", lambda: (need["adapters"] + need["experts"]) // 2)

    def stop(*args, **kwargs):
        raise RuntimeError("stopped before loading")

    monkeypatch.setattr(moe_fx.formats.loading, "load_model", stop)
    argv = ["prune", str(micro_path), "--ratio", "0.25", "--calib", str(calib_path), "--no-eval", "--device", "cpu", "--out", str(tmp_path / "out")]
    with contextlib.suppress(RuntimeError):  # what comes next (the sample's own memory check, or loading) is not this test's
        cli.main([*argv, "--preset", "best", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert "fitted to this machine: --distill-train adapters (training the experts would hold" in out
    assert "--preset best: --distill-lr 0.003 with --distill-train adapters" in out
    assert "distillation will hold" in out and "adapters" in out.split("distillation will hold")[1].splitlines()[0]
    code = cli.main([*argv, "--method", "reap", "--distill-steps", "2", "--distill-train", "experts", "--dtype", "float32"])
    err = capsys.readouterr().err
    assert code == 2 and "distillation would hold" in err and "--distill-train adapters needs" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("stream", [False, True])
def test_cli_refuses_before_loading(stream, micro_path, calib_path, tmp_path, capsys, monkeypatch):
    """With less memory available than the NAEE sample needs, `moe-fx prune` exits 2 with one line, loads nothing,
    writes nothing; `--search-samples` lowers the need and the same command then runs."""
    monkeypatch.setattr(calibrate, "host_memory_available", lambda: 2**20)

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(moe_fx.formats.loading, "load_model", no_load)
        code = cli.main(_prune(micro_path, calib_path, out, *(["--stream", "on"] if stream else [])))
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "sampled tokens in CPU memory" in lines[0], lines
    assert ("--stream on" in lines[0]) is not stream
    assert not out.exists()
    code = cli.main(_prune(micro_path, calib_path, out, "--search-samples", "8", *(["--stream", "on"] if stream else [])))
    assert code == 0, capsys.readouterr().err
    assert (out / "config.json").exists()
