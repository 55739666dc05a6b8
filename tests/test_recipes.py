"""Every advertised recipe through ``moe-fx prune``, on tiny checkpoints of the families people prune.

Each cell runs the command line (:func:`moe_fx.cli.main`) on a tiny random checkpoint written the way the hub
stores it (config, safetensors, tokenizer) and checks what a user relies on: exit 0, the summary table printed
and ``report.md`` written, and the checkpoint reloading (in stock transformers, or through ``moe_fx.load`` for
the per-layer format) with exactly the logits the pruned model had in memory; a streamed prune reloads with
the logits of the same recipe run in memory. A combination the family cannot take is refused with one line
and exit status 2 *before the model is loaded* (no calibration wasted).

The default suite runs :data:`FAST` (every recipe once, every family at least twice, every refusal); the whole
matrix runs with ``pytest -m full_matrix tests/test_recipes.py`` (about 5 minutes on 2 CPU cores).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import auto_class, tiny_checkpoint

from moe_fx import cli, load
from moe_fx.evaluate.nll import build_eval_set, evaluate_nll
from moe_fx.formats import checkpoint as checkpoint_module
from moe_fx.formats.loading import load_tokenizer
from moe_fx.kernels.implementation import DEFAULT_IMPLEMENTATION, set_implementation
from moe_fx.model.per_layer import LAYOUT_KEY

FAMILIES = ("qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3", "gpt_oss", "olmoe", "qwen2_moe", "granitemoe")

_EEP = "--eep-population 4 --eep-generations 2 --fitness-tokens 1024"
_CHANNELS = "--granularity channel --multiple 8"
RECIPES: dict[str, str] = {
    "random": "--method random --ratio 0.25",
    "frequency": "--method frequency --ratio 0.25",
    "reap": "--method reap --ratio 0.25",
    "shape": "--method shape --ratio 0.25",
    "naee": "--method naee --ratio 0.25",
    "eep": f"--method eep --ratio 0.25 {_EEP}",
    "merge-reap": "--method merge-reap --ratio 0.25",
    "merge-frequency": "--method merge-frequency --ratio 0.25",
    "reap-global": "--method reap --allocation global --ratio 0.25",
    "reap-compensate": "--method reap --ratio 0.25 --compensate",
    "reap-distill": "--method reap --ratio 0.25 --distill-steps 2",
    # the README's recommended combinations
    "reap-compensate-distill": "--method reap --ratio 0.25 --compensate --distill-steps 2",
    "reap-distill-adapters": "--method reap --ratio 0.25 --distill-steps 2 --distill-train adapters --distill-rank 4",
    "eep-global-compensate": f"--method eep --allocation global --compensate --ratio 0.5 {_EEP}",
    "eep-global-compensate-distill": f"--method eep --allocation global --compensate --ratio 0.25 --distill-steps 2 {_EEP}",
    "fisher": f"{_CHANNELS} --method fisher --ratio 0.5",
    "fisher-compensate": f"{_CHANNELS} --method fisher --ratio 0.5 --compensate",
    "heapr": f"{_CHANNELS} --method heapr --allocation expert --ratio 0.5",
    "coverage": f"{_CHANNELS} --method coverage --allocation coverage --ratio 0.5",
    "obs-buckets-compensate": f"{_CHANNELS} --method obs --allocation buckets --ratio 0.5 --compensate",
    "experts-then-channels": f"{_CHANNELS} --expert-ratio 0.25 --ratio 0.333 --compensate",
    "experts-then-obs": f"{_CHANNELS} --expert-ratio 0.25 --method obs --ratio 0.333 --compensate",
    "stream-reap": "--method reap --ratio 0.25 --stream on",
    "stream-reap-compensate": "--method reap --ratio 0.25 --compensate --stream on",
    "stream-experts-then-obs": f"{_CHANNELS} --expert-ratio 0.25 --method obs --ratio 0.333 --compensate --stream on",
    "compiled-calibration": "--method reap --ratio 0.25 --compiled-calibration",
    "preset-best-oneshot-params": "--preset best-oneshot-params --ratio 0.5 --stream off",
    "stream-preset-best-oneshot-params": "--preset best-oneshot-params --ratio 0.5 --stream on",  # with --sequential
    "mone": "--method mone --ratio 0.25",
    "mone-compensate": "--method mone --ratio 0.25 --compensate",
    "stream-mone-compensate": "--method mone --ratio 0.25 --compensate --stream on",
    # pruned, then written quantized
    "reap-fp8": "--method reap --ratio 0.25 --quantize fp8-block",
    "reap-compensate-fp8-linear": "--method reap --ratio 0.25 --compensate --quantize fp8-block --quantize-targets linear",
    "fisher-int4": f"{_CHANNELS} --method fisher --ratio 0.5 --quantize int4-group --quantize-group-size 16",
    "stream-reap-int8": "--method reap --ratio 0.25 --stream on --quantize int8-channel",
}
"""Recipe name -> ``moe-fx prune`` options (the data options are added by :func:`_argv`)."""

STREAMED_EQUIVALENT = {"stream-reap": "reap", "stream-reap-compensate": "reap-compensate", "stream-experts-then-obs": "experts-then-obs",
                       "stream-mone-compensate": "mone-compensate"}
"""Streamed recipes and the in-memory recipe whose checkpoint they must reproduce."""

SEQUENTIAL = {"stream-preset-best-oneshot-params"}
"""Streamed recipes that calibrate each layer on the pruned layers' outputs: no in-memory pipeline computes the same
(``tests/test_streaming.py`` checks that against a model whose earlier layers are pruned); they must write a checkpoint
that reloads to what the run evaluated."""

QUANTIZED = {recipe: options.split("--quantize ")[1].split()[0] for recipe, options in RECIPES.items() if "--quantize " in options}
"""Recipes that write the pruned model quantized, and their scheme: the run also reports the saved checkpoint's NLL."""

REFUSED: dict[tuple[str, str], str] = {
    ("deepseek_v3", "shape"): "group-limited routing",
    ("deepseek_v3", "naee"): "group-limited routing",
    **{(family, recipe): "stores its experts fused" for family in ("gpt_oss", "granitemoe") for recipe in QUANTIZED},
}
"""Cells that must be refused up front, with a phrase of the one-line reason."""

FAST = list(dict.fromkeys([(FAMILIES[i % len(FAMILIES)], recipe) for i, recipe in enumerate(RECIPES)] + [
    (f, r) for (f, r) in REFUSED
] + [("gpt_oss", "reap-compensate-distill"), ("deepseek_v3", "reap-compensate"), ("qwen2_moe", "experts-then-channels"), ("qwen2_moe", "mone"),
      ("mixtral", "stream-reap-int8"), ("deepseek_v3", "reap-compensate-fp8-linear")]))
"""The cells the default suite runs: each recipe on one family (rotating), the refusals, and the combinations
that failed before (GPT-OSS and group-limited compensation, shared experts with channels), MoNE's constants held
beside the experts (the rotation gives it GPT-OSS, where they fold into the stock format), and the quantized
recipes the rotation gives a family that refuses them (experts stored fused) on families that take them (MLA's
attention in FP8 too)."""

PROBE = torch.randint(3, 8000, (2, 12), generator=torch.Generator().manual_seed(0))
"""Token ids the in-memory and reloaded models are compared on."""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, micro_path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {f: tiny_checkpoint(f, root / f, tokenizer_from=micro_path) for f in FAMILIES}


def _argv(source: Path, recipe: str, out: Path, calib: Path, valid: Path) -> list[str]:
    return ["prune", str(source), *RECIPES[recipe].split(), "--calib", str(calib), "--calib-tokens", "4096", "--seq-len", "128",
            "--eval-data", str(valid), "--eval-seq-len", "64", "--eval-seqs", "1", "--compensate-samples", "512",
            "--device", "cpu", "--quiet", "--out", str(out)]


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE, use_cache=False).logits.float()


def _reloaded_model(out: Path, ragged: bool = False):
    """The saved checkpoint: stock ``from_pretrained`` for a stock config (with moe-fx's experts kernels, which the
    in-memory model ran), ``moe_fx.load`` for the per-layer format (experts in width buckets padded again, as the
    in-memory model held them, unless ``ragged``)."""
    from transformers import AutoConfig

    import moe_fx

    layout = json.loads((out / "config.json").read_text()).get(LAYOUT_KEY)
    if layout:  # substituted experts (MoNE) have no padded form: held as in memory
        return moe_fx.load(out, ragged=ragged or any("novices" in b for b in layout["blocks"].values()))
    model = auto_class(AutoConfig.from_pretrained(out)).from_pretrained(out).eval()
    set_implementation(model, DEFAULT_IMPLEMENTATION)
    return model


def _reloaded_logits(out: Path) -> torch.Tensor:
    return _logits(_in_own_memory(_reloaded_model(out)))


def _in_own_memory(model):
    """``model`` with every tensor copied out of the checkpoint's memory map: the CPU's matmuls round differently
    (last bits) for data at a different alignment, and a tensor mapped from a safetensors file lies wherever the
    file's header length puts it, so bit-identical weights would not give bit-identical logits."""
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data = tensor.data.clone()
    return model


def _run(family: str, recipe: str, checkpoints, tmp_path: Path, calib_path, valid_path, capsys, monkeypatch):
    """Run one cell; return (exit code, stdout, stderr, output dir, logits of the model as it was saved)."""
    saved: list[torch.Tensor] = []
    original = checkpoint_module.save_checkpoint

    def recording_save(model, *args, **kwargs):
        saved.append(_logits(model))
        return original(model, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_checkpoint", recording_save)
    out = tmp_path / f"{family}-{recipe}"
    code = cli.main(_argv(checkpoints[family], recipe, out, calib_path, valid_path))
    stdout, stderr = capsys.readouterr()
    monkeypatch.setattr(checkpoint_module, "save_checkpoint", original)
    return code, stdout, stderr, out, saved[0] if saved else None


def _check_cell(family, recipe, checkpoints, tmp_path, calib_path, valid_path, capsys, monkeypatch) -> None:
    if (family, recipe) in REFUSED:
        import moe_fx.formats.loading

        def no_load(*args, **kwargs):
            raise AssertionError("the model was loaded before the refusal")

        monkeypatch.setattr(moe_fx.formats.loading, "load_model", no_load)
        code, stdout, stderr, out, _ = _run(family, recipe, checkpoints, tmp_path, calib_path, valid_path, capsys, monkeypatch)
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and REFUSED[family, recipe] in lines[0], stderr
        assert not out.exists()
        return
    code, stdout, stderr, out, in_memory = _run(family, recipe, checkpoints, tmp_path, calib_path, valid_path, capsys, monkeypatch)
    assert code == 0, stderr
    assert "moe-fx prune" in stdout and "NLL mean" in stdout and (out / "report.md").is_file()
    if recipe in QUANTIZED:  # the row of the saved checkpoint is what the checkpoint, read back, scores
        record = json.loads((out / "moe_fx.json").read_text())
        assert record["quantization"]["scheme"] == QUANTIZED[recipe] and f"NLL mean as saved ({QUANTIZED[recipe]})" in stdout
        eval_set = build_eval_set(valid_path, load_tokenizer(out), seq_len=64, seqs_per_domain=1)
        saved = evaluate_nll(load(out, device="cpu"), eval_set, show_progress=False)
        assert saved["mean"]["nll"] == pytest.approx(record["eval_saved"]["mean"]["nll"], abs=1e-4)
        assert record["eval_saved"]["mean"]["nll"] != record["eval_after"]["mean"]["nll"]  # the codes are not the weights
        return
    reloaded = _reloaded_logits(out)
    if recipe in STREAMED_EQUIVALENT:  # no in-memory model: the same recipe pruned in memory is the reference
        code, _, stderr, ref_out, in_memory = _run(family, STREAMED_EQUIVALENT[recipe], checkpoints, tmp_path, calib_path, valid_path, capsys, monkeypatch)
        assert code == 0, stderr
        torch.testing.assert_close(reloaded, _reloaded_logits(ref_out), rtol=0, atol=1e-5)
        return
    if recipe in SEQUENTIAL:
        record = json.loads((out / "moe_fx.json").read_text())
        assert record["cli"]["sequential"] and record["streaming"]["layers"] >= 2
        eval_set = build_eval_set(valid_path, load_tokenizer(out), seq_len=64, seqs_per_domain=1)
        after = evaluate_nll(_reloaded_model(out), eval_set, show_progress=False)
        assert after["mean"]["nll"] == pytest.approx(record["eval_after"]["mean"]["nll"], abs=1e-4)
        return
    assert in_memory is not None
    torch.testing.assert_close(reloaded, in_memory, rtol=0, atol=0)
    if "expert_storage" in json.loads((out / "moe_fx.json").read_text()):  # held in width buckets: the same up to float rounding
        torch.testing.assert_close(_logits(_in_own_memory(_reloaded_model(out, ragged=True))), in_memory, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family, recipe", FAST)
def test_recipe(family, recipe, checkpoints, tmp_path, calib_path, valid_path, capsys, monkeypatch):
    _check_cell(family, recipe, checkpoints, tmp_path, calib_path, valid_path, capsys, monkeypatch)


@pytest.mark.full_matrix
@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_recipe_matrix(family, recipe, checkpoints, tmp_path, calib_path, valid_path, capsys, monkeypatch):
    _check_cell(family, recipe, checkpoints, tmp_path, calib_path, valid_path, capsys, monkeypatch)


def test_the_fast_subset_covers_every_recipe_and_family():
    cells = set(FAST)
    assert {r for _, r in cells} == set(RECIPES) and {f for f, _ in cells} == set(FAMILIES)
    assert set(REFUSED) <= cells
