"""Streaming (one decoder layer at a time) against the in-memory pipeline: same kept sets, same tensors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_channels import channel_model
from tiny_models import OVERRIDES, _kwargs, auto_class, tiny_config, tiny_model
from transformers import AutoConfig

from moe_fx import compose
from moe_fx.errors import BadOptionError, NotAModelError, OutputPathError, UnsupportedFamilyError
from moe_fx.evaluate.nll import EvalSet, build_eval_set, evaluate_nll
from moe_fx.formats import save_checkpoint
from moe_fx.formats.loading import load_model, load_tokenizer
from moe_fx.formats.partial import PartialCheckpoint
from moe_fx.passes import Calibrate, CompensateExperts, DropExperts, MergeExperts, PruneChannels, Score
from moe_fx.run.streaming import stream_evaluate, stream_prune

TOKENS = torch.randint(3, 128, (6, 24), generator=torch.Generator().manual_seed(3))


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _rounded(value):
    if isinstance(value, float):
        return round(value, 5)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return [_rounded(v) for v in value] if isinstance(value, list) else value


def _assert_same_checkpoint(streamed: Path, in_memory: Path) -> None:
    a, b = _tensors(streamed), _tensors(in_memory)
    assert sorted(a) == sorted(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:3]}"
    ra, rb = (json.loads((p / "moe_fx.json").read_text()) for p in (streamed, in_memory))
    assert ra["plan"] == rb["plan"] and ra["scores"] == rb["scores"] and ra["channel_plan"] == rb["channel_plan"]
    assert ra["experts_after"] == rb["experts_after"] and ra["widths_after"] == rb["widths_after"]
    # per-layer reports are combined: a mean over layers of rounded per-block means may differ in the last digit
    assert _rounded([p["report"] for p in ra["passes"][1:]]) == _rounded([p["report"] for p in rb["passes"][1:]])
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (streamed, in_memory))
    assert ca == cb
    index = json.loads((streamed / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(a)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in a.values())


def _both(source: Path, tmp_path: Path, passes, **stream_options) -> tuple[Path, Path]:
    streamed = stream_prune(source, tmp_path / "streamed", passes(), show_progress=False, **stream_options)
    model = compose(*passes())(load_model(source))
    save_checkpoint(model, tmp_path / "in_memory", source=source)
    return streamed.out, tmp_path / "in_memory"


def _saved_tiny(model_type: str, path: Path, **overrides) -> Path:
    if overrides:
        cls = type(AutoConfig.for_model(model_type))
        config = cls(**_kwargs(cls, {**OVERRIDES.get(model_type, {}), **overrides}))
        torch.manual_seed(0)
        model = auto_class(config).from_config(config).eval()
    else:
        model = tiny_model(model_type)
    model.save_pretrained(path)
    return path


def _reap(*extra, observers=("routing", "reap")):
    return lambda: [Calibrate(TOKENS, batch_size=4, observers=observers, show_progress=False), Score("reap"), DropExperts(ratio=0.25), *extra]


@pytest.mark.parametrize("model_type, overrides", [
    ("mixtral", {}),
    ("deepseek_v3", {"num_hidden_layers": 3, "first_k_dense_replace": 1}),  # a dense first layer
    ("gpt_oss", {}),  # sliding-window layers, biases, transposed interleaved experts
    # GLM-5's sparse attention: a "shared" layer reuses the previous layer's top-k indices, handed from layer to layer
    ("glm_moe_dsa", {"num_hidden_layers": 3, "indexer_types": ["full", "shared", "full"], "mlp_layer_types": ["sparse"] * 3}),
])
def test_streaming_equals_in_memory(model_type, overrides, tmp_path):
    source = _saved_tiny(model_type, tmp_path / "src", **overrides)
    _assert_same_checkpoint(*_both(source, tmp_path, _reap()))


def test_streaming_hands_each_batch_its_own_layer_state(tmp_path):
    """Mistral-Large-4 passes sparse-attention indices from layer to layer and fills a KV dict in one layer that the
    next reads (``kv_source_layers``): a streamed run keeps both per batch of windows (three batches of one shape here,
    which share their captured layer calls), so it reproduces the in-memory prune: the same plan and scores, and the
    same logits once reloaded (its stock save writes Mistral's own tensor names, the streamed one transformers')."""
    config = tiny_config("mistral_large4")
    text = config.get_text_config()
    text.indexer_types, text.kv_source_layers = ["full", "shared"], [0, 0]  # layer 1 reuses layer 0's indices and KV
    torch.manual_seed(0)
    model = auto_class(config).from_config(config).eval()
    assert [layer.self_attn.is_kv_shared_layer for layer in model.model.language_model.layers] == [False, True]
    source = tmp_path / "src"
    model.save_pretrained(source)
    passes = lambda: [Calibrate(TOKENS, batch_size=2, show_progress=False), Score("reap"), DropExperts(ratio=0.25)]
    streamed, in_memory = _both(source, tmp_path, passes)
    ra, rb = (json.loads((p / "moe_fx.json").read_text()) for p in (streamed, in_memory))
    assert ra["plan"] == rb["plan"] and ra["scores"] == rb["scores"]
    with torch.no_grad():
        logits = [load_model(p)(input_ids=TOKENS).logits for p in (streamed, in_memory)]
    assert torch.equal(*logits)


def test_streaming_equals_in_memory_with_compensation_and_merge(micro_path, tmp_path):
    passes = lambda: [
        Calibrate(TOKENS, batch_size=4, observers=("routing", "reap", "samples", "inputs"), show_progress=False),
        Score("reap"), MergeExperts(ratio=0.25), CompensateExperts(),
    ]
    streamed, in_memory = _both(micro_path, tmp_path, passes)
    _assert_same_checkpoint(streamed, in_memory)
    a, b = load_model(streamed), load_model(in_memory)
    assert torch.equal(a(TOKENS).logits, b(TOKENS).logits)


@pytest.mark.parametrize("method, observer", [("activation", "channels"), ("obs", "inputs")])
def test_streaming_channels_equals_in_memory(method, observer, micro_path, tmp_path):
    passes = lambda: [
        Calibrate(TOKENS, batch_size=4, observers=("routing", "reap", observer), show_progress=False),
        Score("reap"), DropExperts(ratio=0.25), Score(method), PruneChannels(ratio=0.5),
    ]
    _assert_same_checkpoint(*_both(micro_path, tmp_path, passes))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the samples stay on the GPU only in a run on a GPU")
@pytest.mark.parametrize("method", ["naee", "reap"])
def test_samples_kept_on_the_gpu_give_the_cpu_samples_output(method, micro_path, tmp_path, monkeypatch):
    """A streamed layer's token samples stay on the GPU (no copy to the host per batch): the same plan, and the same
    merged, compensated and channel-pruned weights as with the samples in CPU memory."""
    import moe_fx.run.streaming as streaming

    passes = lambda: [
        Calibrate(TOKENS, batch_size=2, observers=("routing", "reap", "samples", "inputs"), show_progress=False),
        Score(method), MergeExperts(ratio=0.25), CompensateExperts(), Score("obs"), PruneChannels(ratio=0.25),
    ]
    on_gpu = stream_prune(micro_path, tmp_path / "gpu", passes(), device="cuda", show_progress=False).out
    monkeypatch.setattr(streaming, "keep_samples_on", lambda *a, **k: False)
    on_host = stream_prune(micro_path, tmp_path / "host", passes(), device="cuda", show_progress=False).out
    ra, rb = (json.loads((p / "moe_fx.json").read_text()) for p in (on_gpu, on_host))
    assert ra["plan"] == rb["plan"] and ra["channel_plan"] == rb["channel_plan"]
    a, b = _tensors(on_gpu), _tensors(on_host)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_sharded_source_with_index(micro_path, tmp_path):
    source = tmp_path / "sharded"
    load_model(micro_path).save_pretrained(source, max_shard_size="200KB")
    assert (source / "model.safetensors.index.json").is_file() and len(list(source.glob("*.safetensors"))) > 2
    _assert_same_checkpoint(*_both(source, tmp_path, _reap()))


def test_missing_shard_is_named_and_nothing_is_written(micro_path, tmp_path):
    source = tmp_path / "sharded"
    load_model(micro_path).save_pretrained(source, max_shard_size="200KB")
    victim = sorted(source.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(NotAModelError, match=victim.name):
        stream_prune(source, tmp_path / "out", _reap()(), show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded"]


@pytest.mark.parametrize("snapshot_seconds", [0.0, 1e9])  # resume from saved hidden states / by replaying layer 0
def test_interrupted_run_resumes_to_the_same_output(micro_path, tmp_path, monkeypatch, snapshot_seconds):
    reference = stream_prune(micro_path, tmp_path / "reference", _reap(CompensateExperts(), observers=("routing", "reap", "inputs"))(),
                             show_progress=False).out
    passes = _reap(CompensateExperts(), observers=("routing", "reap", "inputs"))
    write = PartialCheckpoint.write_shard
    calls = []

    def interrupted(self, name, tensors):
        calls.append(name)
        if len(calls) == 2:  # layer 1: a Ctrl-C in the middle of the run
            raise KeyboardInterrupt
        return write(self, name, tensors)

    monkeypatch.setattr(PartialCheckpoint, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        stream_prune(micro_path, tmp_path / "out", passes(), show_progress=False, snapshot_seconds=snapshot_seconds)
    assert not (tmp_path / "out").exists()
    partial = tmp_path / ".out.partial"
    assert json.loads((partial / "progress.json").read_text())["layers"].keys() == {"0"}
    assert (partial / "hidden_states.pt").is_file() == (snapshot_seconds == 0)
    monkeypatch.setattr(PartialCheckpoint, "write_shard", write)
    with pytest.raises(OutputPathError, match="different run"):  # other options: not resumed, not overwritten
        stream_prune(micro_path, tmp_path / "out", _reap()(), show_progress=False)
    resumed = stream_prune(micro_path, tmp_path / "out", passes(), show_progress=False, report=False)
    assert resumed.resumed_layers == 1 and not partial.exists()
    assert (reference / "report.md").is_file() and not (resumed.out / "report.md").exists()  # report=False: the caller writes it
    assert json.loads((resumed.out / "moe_fx.json").read_text())["streaming"]["resumed_layers"] == 1
    a, b = _tensors(resumed.out), _tensors(reference)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_streamed_evaluation_equals_in_memory(micro_path, valid_path):
    eval_set = build_eval_set(valid_path, load_tokenizer(micro_path), seq_len=64, seqs_per_domain=3)
    assert stream_evaluate(micro_path, eval_set, batch_size=2, show_progress=False) == evaluate_nll(
        load_model(micro_path), eval_set, batch_size=2, show_progress=False)


@pytest.mark.parametrize("passes, message", [
    ([Calibrate(TOKENS), Score("reap"), DropExperts(ratio=0.25, allocation="global")], "allocation 'global'"),
    ([Calibrate(TOKENS, observers=("routing", "channel_grads")), Score("fisher"), PruneChannels(ratio=0.5)], "gradient"),
    ([Calibrate(TOKENS, observers=("channels",)), Score("activation"), PruneChannels(ratio=0.5, allocation="expert")], "allocation 'expert'"),
    ([Calibrate(TOKENS), Score("reap"), Calibrate(TOKENS)], "Calibrate first"),
])
def test_passes_that_need_the_whole_model_are_refused(micro_path, tmp_path, passes, message):
    with pytest.raises(BadOptionError, match=message):
        stream_prune(micro_path, tmp_path / "out", passes, show_progress=False)
    assert not list(tmp_path.iterdir())


def test_cli_stream(micro_path, calib_path, tmp_path, capsys):
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "moe_fx", "prune", str(micro_path), "--ratio", "0.25", "--calib", str(calib_path), "--calib-tokens", "4096",
         "--seq-len", "128", "--eval-seqs", "2", "--eval-seq-len", "128", "--stream", "on", "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert "streamed 2 layers (0 resumed)" in run.stdout and "NLL mean" in run.stdout
    record = json.loads((out / "moe_fx.json").read_text())
    assert record["eval_after"]["mean"]["nll"] > record["eval_before"]["mean"]["nll"] > 0
    assert [len(v) for v in record["plan"]["kept_experts"].values()] == [6, 6]
    report = json.loads((out / "report.json").read_text())  # written after the streamed evaluation
    assert report["nll"]["mean"]["nll"]["after"] == record["eval_after"]["mean"]["nll"] and (out / "plots" / "importance.png").stat().st_size > 0
    from moe_fx.cli import main  # the refusal in this process: the run above is the subprocess test of the command

    refused = main(["prune", str(micro_path), "--method", "eep", "--ratio", "0.25", "--calib", str(calib_path), "--stream", "on",
                    "--out", str(tmp_path / "eep")])
    assert refused == 2 and "cannot stream" in capsys.readouterr().err


def test_cli_streamed_channels_default_to_obs(micro_path, calib_path, tmp_path):
    """Fisher, the in-memory default, needs the whole model's gradient: a streamed channel prune scores by obs unless told."""
    from moe_fx.cli import main

    out = tmp_path / "channels"
    code = main(["prune", str(micro_path), "--granularity", "channel", "--ratio", "0.5", "--compensate", "--calib", str(calib_path),
                 "--calib-tokens", "2048", "--seq-len", "128", "--compensate-samples", "512", "--no-eval", "--stream", "on", "--quiet",
                 "--out", str(out)])
    assert code == 0
    record = json.loads((out / "moe_fx.json").read_text())
    assert record["scores"]["method"] == "obs" and set(record["widths_after"].values()) == {32}  # half of 64


def _layer0_replaced_by(model, pruned_layer):
    """``model`` whose decoder layer 0 hands on ``pruned_layer``'s output for the same call (its own MoE block still
    runs first, so its observers see the unpruned layer 0, as a streamed run's do)."""
    def swap(module, args, kwargs, output):
        return pruned_layer(*args, **kwargs)

    model.model.layers[0].register_forward_hook(swap, with_kwargs=True)
    return model


def test_sequential_calibrates_each_layer_on_the_pruned_layers_before_it(micro_path, tmp_path):
    """Layer 1 of a sequential run is scored, dropped and compensated exactly as in memory on the model whose layer 0 is
    already the pruned one; layer 0 is what a plain streamed run writes."""
    passes = _reap(CompensateExperts(), observers=("routing", "reap", "inputs"))
    seq = stream_prune(micro_path, tmp_path / "seq", passes(), show_progress=False, sequential=True).out
    plain = stream_prune(micro_path, tmp_path / "plain", passes(), show_progress=False).out
    a, b = _tensors(seq), _tensors(plain)
    layer0 = [k for k in a if ".layers.0." in k]
    assert layer0 and all(torch.equal(a[k], b[k]) for k in layer0)
    assert any(not torch.equal(a[k], b[k]) for k in a if ".layers.1." in k)

    reference = _layer0_replaced_by(load_model(micro_path), load_model(seq).model.layers[0])
    reference = compose(*passes())(reference)
    save_checkpoint(reference, tmp_path / "reference", source=micro_path)
    r, s = (json.loads((p / "moe_fx.json").read_text()) for p in (tmp_path / "reference", seq))
    assert r["plan"] == s["plan"]
    c = _tensors(tmp_path / "reference")
    for k in (k for k in a if ".layers.1." in k):
        torch.testing.assert_close(a[k], c[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("snapshot_seconds", [0.0, 1e9])
def test_interrupted_sequential_run_redoes_what_it_cannot_replay(micro_path, tmp_path, monkeypatch, snapshot_seconds):
    """A finished layer replays from the source, unpruned, which a sequential run must not hand on: it resumes from the
    hidden states saved after the last finished layer, or redoes every layer, to the uninterrupted run's output."""
    passes = _reap(CompensateExperts(), observers=("routing", "reap", "inputs"))
    reference = stream_prune(micro_path, tmp_path / "reference", passes(), show_progress=False, sequential=True).out
    write, calls = PartialCheckpoint.write_shard, []

    def interrupted(self, name, tensors):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return write(self, name, tensors)

    monkeypatch.setattr(PartialCheckpoint, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        stream_prune(micro_path, tmp_path / "out", passes(), show_progress=False, snapshot_seconds=snapshot_seconds, sequential=True)
    monkeypatch.setattr(PartialCheckpoint, "write_shard", write)
    with pytest.raises(OutputPathError, match="different run"):  # the plain run is another run
        stream_prune(micro_path, tmp_path / "out", passes(), show_progress=False)
    resumed = stream_prune(micro_path, tmp_path / "out", passes(), show_progress=False, snapshot_seconds=snapshot_seconds, sequential=True)
    assert resumed.resumed_layers == (1 if snapshot_seconds == 0 else 0)
    a, b = _tensors(resumed.out), _tensors(reference)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_sequential_refusals(micro_path, tmp_path):
    with pytest.raises(BadOptionError, match="teacher cache"):
        stream_prune(micro_path, tmp_path / "out", _reap()(), show_progress=False, sequential=True, teacher_cache=tmp_path / "cache")
    assert not list(tmp_path.iterdir())


def _bucket_passes():
    return [Calibrate(TOKENS, batch_size=4, observers=("routing", "channels"), show_progress=False), Score("activation"),
            PruneChannels(ratio=0.5, allocation="buckets-per-layer")]


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])  # gpt_oss: transposed, interleaved experts with biases
def test_streamed_width_buckets_equal_in_memory(family, tmp_path):
    """Per-expert widths planned layer by layer are written in width buckets as the in-memory save writes them (tensors,
    config, storage record), and the streamed evaluation runs the buckets."""
    source = tmp_path / "src"
    channel_model(family).save_pretrained(source)
    streamed, in_memory = _both(source, tmp_path, _bucket_passes)
    _assert_same_checkpoint(streamed, in_memory)
    ra, rb = (json.loads((p / "moe_fx.json").read_text()) for p in (streamed, in_memory))
    assert ra["expert_storage"] == rb["expert_storage"] and ra["expert_storage"]["buckets"]
    assert ra["expert_storage"]["routed_params_stored"] < ra["expert_storage"]["routed_params_padded"]
    eval_set = EvalSet({"d": TOKENS[:4]}, "tokens")
    nll = lambda result: result["mean"]["nll"]
    assert nll(stream_evaluate(streamed, eval_set, batch_size=2, show_progress=False)) == pytest.approx(
        nll(evaluate_nll(load_model(in_memory, experts_implementation=None), eval_set, batch_size=2, show_progress=False)), abs=1e-5)


def test_streamed_padded_storage_and_a_layout_that_would_not_load(tmp_path, monkeypatch):
    """``expert_storage="padded"`` writes what the in-memory padded save writes; a config that would not build the
    written tensors (here: buckets left out of it) fails before the output exists."""
    source = tmp_path / "src"
    channel_model("qwen3_moe").save_pretrained(source)
    streamed = stream_prune(source, tmp_path / "streamed", _bucket_passes(), show_progress=False, expert_storage="padded")
    save_checkpoint(compose(*_bucket_passes())(load_model(source)), tmp_path / "in_memory", source=source, expert_storage="padded")
    _assert_same_checkpoint(streamed.out, tmp_path / "in_memory")
    assert "expert_storage" not in json.loads((streamed.out / "moe_fx.json").read_text())
    monkeypatch.setattr("moe_fx.run.streaming.record_buckets", lambda *a: None)
    with pytest.raises(UnsupportedFamilyError, match="would not load back"):
        stream_prune(source, tmp_path / "bad", _bucket_passes(), show_progress=False)
    assert not (tmp_path / "bad").exists()
