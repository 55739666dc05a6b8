"""Pruning a quantized checkpoint (the hub's block-wise FP8, compressed-tensors' int8 / int4): read dense in memory and
streamed (a streamed read once loaded the raw FP8 codes without their scales, and the in-memory save failed in
transformers), written back in the source's own format (scheme, group size, targets) unless ``--quantize`` says
otherwise; refusals of what cannot be read or set, before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from prune_cli import prune_argv
from tiny_models import tiny_checkpoint

import moe_fx
from moe_fx.cli import main
from moe_fx.formats.quantized_checkpoint import quantize_checkpoint
from moe_fx.formats.stored_format import StoredFormat, stored_format

pytest.importorskip("compressed_tensors")

FORMATS = {"fp8-block": StoredFormat("fp8-block", targets="linear"), "int8-channel": StoredFormat("int8-channel"),
           "int4-group": StoredFormat("int4-group", group_size=32)}
"""The sources' formats: FP8 with attention quantized too (as the hub's FP8 checkpoints), int4 in groups of 32 (the
tiny model's sizes)."""


@pytest.fixture(scope="module")
def dense_source(tmp_path_factory, micro_path) -> Path:
    return tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("dense") / "src", tokenizer_from=micro_path)


def _quantized(dense: Path, fmt: StoredFormat, root: Path) -> Path:
    out = root / fmt.scheme
    quantize_checkpoint(dense, out, scheme=fmt.scheme, group_size=fmt.group_size, targets=fmt.targets)
    return out


def _experts(path: Path) -> dict[str, torch.Tensor]:
    """Every block's routed experts' weights as the checkpoint's dense load holds them."""
    model = moe_fx.load(path, ragged=False)
    return {n: p.detach().float() for n, p in model.named_parameters() if ".experts." in n}


@pytest.mark.parametrize("scheme", list(FORMATS))
def test_pruned_in_memory_and_streamed_keep_the_source_format(scheme, dense_source, calib_path, tmp_path, capsys) -> None:
    fmt = FORMATS[scheme]
    source = _quantized(dense_source, fmt, tmp_path)
    assert stored_format(source) == fmt
    outs = {}
    for stream in ("off", "on"):
        outs[stream] = tmp_path / f"pruned-{stream}"
        assert main(prune_argv(source, calib_path, outs[stream], "--method", "reap", "--stream", stream)) == 0, capsys.readouterr().err
        assert stored_format(outs[stream]) == fmt  # the pruned checkpoint is written as its source was
    record = json.loads((outs["off"] / "moe_fx.json").read_text())
    assert record["quantization"]["scheme"] == scheme
    # the kept experts are the source's, read dense (not the raw codes) and written back in its format
    before, after = _experts(source), _experts(outs["off"])
    for block, kept in record["plan"]["kept_experts"].items():
        for name, weight in after.items():
            if name.startswith(block + "."):
                want = before[name][kept]
                assert (weight - want).abs().max() <= 1e-2 * want.abs().max(), name
    streamed = _experts(outs["on"])
    assert after.keys() == streamed.keys() and all(torch.equal(after[n], streamed[n]) for n in after)


def test_quantize_none_writes_dense_and_other_options(dense_source, calib_path, tmp_path, capsys) -> None:
    """``--quantize none`` writes a dense checkpoint; ``--quantize SCHEME`` re-quantizes another way;
    ``--quantize-group-size`` without int4-group is refused before loading."""
    source = _quantized(dense_source, FORMATS["fp8-block"], tmp_path)
    dense = tmp_path / "dense-out"
    assert main(prune_argv(source, calib_path, dense, "--method", "frequency", "--quantize", "none")) == 0, capsys.readouterr().err
    assert "quantization_config" not in json.loads((dense / "config.json").read_text())
    int8 = tmp_path / "int8-out"
    assert main(prune_argv(source, calib_path, int8, "--method", "frequency", "--quantize", "int8-channel")) == 0, capsys.readouterr().err
    assert stored_format(int8) == StoredFormat("int8-channel")  # targets as asked (experts), not the source's
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert main(prune_argv(source, calib_path, bad, "--method", "frequency", "--quantize-group-size", "64")) == 2
    assert "--quantize-group-size" in capsys.readouterr().err and not bad.exists()


def test_streaming_refuses_a_format_it_cannot_read(dense_source, calib_path, tmp_path, capsys) -> None:
    """A source quantized in a format the streamed reader does not know would load its codes as weights: refused in
    one line, nothing written."""
    import shutil

    source = tmp_path / "awq"
    shutil.copytree(dense_source, source)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (source / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert main(prune_argv(source, calib_path, out, "--method", "frequency", "--stream", "on")) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "awq" in err[0] and "--stream off" in err[0] and not out.exists()


def test_fused_experts_are_refused_before_loading(micro_path, calib_path, tmp_path, capsys, monkeypatch) -> None:
    """``prune --quantize`` of a checkpoint whose experts are stored fused (GPT-OSS): the formats have no per-expert
    tensor to write, which was found only after the prune had run; now before the model is loaded."""
    from moe_fx.formats import loading

    source = tiny_checkpoint("gpt_oss", tmp_path / "gpt_oss", tokenizer_from=micro_path)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    assert main(prune_argv(source, calib_path, out, "--method", "reap", "--quantize", "fp8-block")) == 2
    err = capsys.readouterr().err
    assert "stores its experts fused" in err and not out.exists()


def test_channel_pruned_widths_take_a_group_that_tiles_them(dense_source, calib_path, tmp_path, capsys) -> None:
    """int4 groups must tile each expert's inputs, and channel pruning sets the widths only after the passes ran
    (32 -> 24 here, which groups of 32 do not tile): the writer takes the largest group that does, says so and
    records both sizes, where it used to refuse after the prune."""
    source = _quantized(dense_source, FORMATS["int4-group"], tmp_path)
    out = tmp_path / "channels"
    assert main(prune_argv(source, calib_path, out, "--granularity", "channel", "--method", "obs")) == 0, capsys.readouterr().err
    quantization = json.loads((out / "moe_fx.json").read_text())["quantization"]
    assert (quantization["group_size"], quantization["group_size_asked"]) == (8, 32)
    assert stored_format(out) == StoredFormat("int4-group", group_size=8)
    model = moe_fx.load(out)
    assert model.config.moe_intermediate_size == 24
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(3, 100, (1, 8))).logits).all()
