"""Per-expert widths stored at their size: width buckets are planned optimally, the ``buckets`` allocation stores its
budget, and a bucketed checkpoint computes what the padded model computed, in every expert layout."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import subprocess
import sys

import pytest
import torch
from test_channels import channel_model
from test_families import logits, realigned, tiny_model
from transformers import AutoModelForCausalLM

from moe_fx import load
from moe_fx.errors import BadOptionError, UnsupportedFamilyError
from moe_fx.formats import save_checkpoint
from moe_fx.formats.checkpoint import read_record
from moe_fx.model.per_layer import LAYOUT_KEY, has_buckets
from moe_fx.model.trace import trace
from moe_fx.passes import PruneChannels
from moe_fx.plan.buckets import MAX_BUCKETS, plan_buckets
from moe_fx.plan.channel_allocate import bucket_channels, channels_to_keep, make_channel_plan
from moe_fx.plan.plans import ChannelPlan

LAYOUTS = ["qwen3_moe", "gpt_oss", "mixtral", "deepseek_v3", "granitemoe", "qwen2_moe", "nemotron_h"]
"""Concatenated SwiGLU, GPT-OSS (transposed, interleaved, biases, clamped GLU), Mixtral's hub layout, shared experts
with grouped routing, GraniteMoE's layout, a shared expert with a gate, non-gated experts."""


def _stored(groups: list[tuple[int, list[int]]]) -> int:
    return sum(width * len(members) for width, members in groups)


@pytest.mark.parametrize("seed", range(6))
def test_bucket_plan_is_the_least_storage(seed: int) -> None:
    """Against every partition of the experts into at most k groups (each storing its widest member, rounded up)."""
    rng = random.Random(seed)
    widths = [rng.randint(1, 40) for _ in range(rng.randint(1, 7))]
    rounded = [-(-w // 8) * 8 for w in widths]
    for k in (1, 2, 3):
        groups = plan_buckets(widths, k, 8)
        assert sorted(e for _, m in groups for e in m) == list(range(len(widths))) and len(groups) <= k
        assert all(width >= rounded[e] for width, members in groups for e in members)
        best = min(sum(max(rounded[e] for e in g) * len(g) for g in part) for part in _partitions(list(range(len(widths)))) if len(part) <= k)
        assert _stored(groups) == best


def _partitions(items: list[int]):
    if not items:
        yield []
        return
    head, rest = items[0], items[1:]
    for part in _partitions(rest):
        yield [[head], *part]
        for i in range(len(part)):
            yield [*part[:i], [head, *part[i]], *part[i + 1 :]]


def test_bucket_plan_caps_widths_at_the_block_width() -> None:
    assert plan_buckets([3, 12], 4, 8, most=12) == [(8, [0]), (12, [1])]


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_buckets_allocation_stores_its_budget(ratio: float) -> None:
    """At most MAX_BUCKETS widths per block, multiples of 8, the stored channels within the budget and near it, and
    each expert keeps its best channels."""
    from conftest import tiny_qwen3

    spec = trace(tiny_qwen3(num_experts=16))
    g = torch.Generator().manual_seed(1)
    scores = {b.path: torch.rand(b.num_experts, b.experts.intermediate_size, generator=g, dtype=torch.float64) ** 3 for b in spec.blocks}
    plan = bucket_channels(spec, scores, ratio)
    total = sum(b.num_experts * b.experts.intermediate_size for b in spec.blocks)
    stored = sum(len(k) for kept in plan.kept_channels.values() for k in kept)
    assert channels_to_keep(total, ratio) - 8 * 16 <= stored <= channels_to_keep(total, ratio)
    for b in spec.blocks:
        widths = {len(k) for k in plan.kept_channels[b.path] if k}
        assert len(widths) <= MAX_BUCKETS and all(w % 8 == 0 or w == b.experts.intermediate_size for w in widths)
        for e, kept in enumerate(plan.kept_channels[b.path]):
            order = torch.argsort(scores[b.path][e], descending=True, stable=True)[: len(kept)]
            assert sorted(order.tolist()) == kept


def test_buckets_per_layer_is_each_layers_own_budget() -> None:
    """Each block's plan is the ``buckets`` plan of that block alone, within that block's share of the budget, whatever
    the other blocks' scores."""
    from conftest import tiny_qwen3

    spec = trace(tiny_qwen3(num_experts=16))
    g = torch.Generator().manual_seed(2)
    scores = {b.path: torch.rand(b.num_experts, b.experts.intermediate_size, generator=g, dtype=torch.float64) ** 3 for b in spec.blocks}
    first = spec.blocks[0].path
    plan = make_channel_plan(spec, scores, 0.5, "buckets-per-layer")
    louder = make_channel_plan(spec, {**scores, first: scores[first] * 100}, 0.5, "buckets-per-layer")
    assert louder.kept_channels == plan.kept_channels
    for b in spec.blocks:
        alone = bucket_channels(dataclasses.replace(spec, blocks=(b,)), scores, 0.5).kept_channels[b.path]
        assert plan.kept_channels[b.path] == alone
        assert sum(map(len, alone)) <= channels_to_keep(b.num_experts * b.experts.intermediate_size, 0.5)
    assert bucket_channels(spec, {**scores, first: scores[first] * 100}, 0.5, comparable=True).kept_channels != plan.kept_channels


def _two_widths(spec) -> ChannelPlan:
    """Even experts keep a quarter of their channels (at least 8), odd ones all: two buckets in every block."""
    kept = {}
    for b in spec.blocks:
        width = b.experts.intermediate_size
        kept[b.path] = [list(range(max(8, width // 4))) if e % 2 == 0 else list(range(width)) for e in range(b.num_experts)]
    return ChannelPlan(kept, multiple=8)


@pytest.mark.parametrize("family", LAYOUTS)
def test_bucketed_checkpoint_computes_the_padded_model(family: str, tmp_path) -> None:
    model = channel_model(family)
    spec = trace(model)
    if any(b.experts.intermediate_size < 16 or b.experts.call_style != "routed" for b in spec.blocks):
        pytest.skip("no width bucket can save anything here")
    PruneChannels(plan=_two_widths(spec))(model)
    ref = logits(model)
    out = save_checkpoint(model, tmp_path / "bucketed")
    storage = read_record(out)["expert_storage"]
    assert storage["routed_params_stored"] < storage["routed_params_padded"]
    assert all(len(groups) == 2 for groups in storage["buckets"].values())
    bucketed = load(out, experts_implementation=None)
    assert has_buckets(bucketed)
    torch.testing.assert_close(logits(bucketed), ref, rtol=1e-4, atol=1e-5)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)  # the shipped code, without moe-fx
    torch.testing.assert_close(logits(remote), ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(UnsupportedFamilyError, match="width buckets"):
        trace(bucketed)
    padded = realigned(load(out, experts_implementation=None, ragged=False))
    assert not has_buckets(padded) and torch.equal(logits(padded), ref)
    assert [b.experts.intermediate_size for b in trace(padded).blocks] == [b.experts.intermediate_size for b in trace(model).blocks]


def test_moe_fx_kernels_run_the_buckets(tmp_path) -> None:
    """moe-fx's own experts implementation (the default of moe_fx.load) runs each bucket as any experts module."""
    model = tiny_model("qwen3_moe")
    PruneChannels(plan=_two_widths(trace(model)))(model)
    ref = logits(model)
    torch.testing.assert_close(logits(load(save_checkpoint(model, tmp_path / "b"))), ref, rtol=1e-4, atol=1e-5)


def test_padded_storage_and_uniform_widths_stay_stock(tmp_path) -> None:
    model = tiny_model("qwen3_moe")
    PruneChannels(plan=_two_widths(trace(model)))(model)
    out = save_checkpoint(model, tmp_path / "padded", expert_storage="padded")
    assert "expert_storage" not in read_record(out) and not has_buckets(load(out))
    config = json.loads((out / "config.json").read_text())
    assert LAYOUT_KEY not in config  # every block padded to its widest: a stock config describes it
    with pytest.raises(Exception, match="expert_storage 'ragged'"):
        save_checkpoint(model, tmp_path / "bad", expert_storage="ragged")
    assert not (tmp_path / "bad").exists()


def test_widths_a_bucket_cannot_shrink_are_left_padded(tmp_path) -> None:
    """Experts that differ by less than the 8-channel alignment share one bucket: nothing to save, a stock checkpoint."""
    model = tiny_model("qwen3_moe")
    spec = trace(model)
    kept = {b.path: [list(range(w)) for w in itertools.islice(itertools.cycle([9, 13, 16]), b.num_experts)] for b in spec.blocks}
    PruneChannels(plan=ChannelPlan(kept, multiple=8))(model)
    out = save_checkpoint(model, tmp_path / "b")
    assert "expert_storage" not in read_record(out)


def test_quantizing_a_bucketed_checkpoint_is_refused(tmp_path) -> None:
    """It reads the padded experts' tensors shard by shard: refused in one line before anything is written."""
    from moe_fx.formats.quantized_checkpoint import quantize_checkpoint

    model = tiny_model("qwen3_moe")
    PruneChannels(plan=_two_widths(trace(model)))(model)
    out = save_checkpoint(model, tmp_path / "b")
    with pytest.raises(BadOptionError, match="width buckets"):
        quantize_checkpoint(out, tmp_path / "q", scheme="int8-channel")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_a_bucketed_checkpoint_quantizes_in_memory(family: str, tmp_path) -> None:
    """``moe_fx.load(..., quantize=...)`` quantizes each bucket (the family's experts module at one width). Schemes
    whose scales follow rows and input groups from the first input give the codes the padded experts get, so
    the logits are the padded model's quantized the same way; FP8's 128-row blocks group other rows, so it is
    held to its own tolerance against the dense model."""
    from moe_fx.formats.loading import load_model
    from moe_fx.kernels.experts_module import quantization

    model = channel_model(family)
    PruneChannels(plan=_two_widths(trace(model)))(model)
    out = save_checkpoint(model, tmp_path / "b")
    dense = logits(load_model(out))
    for scheme in ("int8-channel", "int4-group", "fp8-block"):
        bucketed = load_model(out, quantize=scheme)
        assert has_buckets(bucketed)
        buckets = [b for m in bucketed.modules() if type(m).__name__ == "BucketedExperts" for b in m.buckets]
        assert buckets and all(quantization(b) == scheme for b in buckets)
        got = logits(bucketed)
        assert not torch.equal(got, dense), scheme  # the codes run, not the dense weights
        if scheme == "fp8-block":
            assert (got - dense).abs().max() < 0.1 * dense.abs().max(), scheme
        else:
            padded = realigned(load_model(out, quantize=scheme, ragged=False))
            torch.testing.assert_close(got, logits(padded), rtol=1e-4, atol=1e-4)


def test_a_fresh_process_switches_a_per_layer_checkpoint_to_the_moe_fx_experts(tmp_path) -> None:
    """transformers allows the switch by finding its decorator in the class's module source; the per-layer class's
    module is moe-fx's, so it must ask the stock class. In the test process another load has usually answered for
    the stock class already, hence a fresh process (``moe-fx eval --quantize`` of such a checkpoint ran transformers'
    eager loop on the codes)."""
    model = tiny_model("mixtral")
    PruneChannels(plan=_two_widths(trace(model)))(model)
    out = save_checkpoint(model, tmp_path / "b")
    script = ("import sys; from moe_fx.formats.loading import load_model; from moe_fx.kernels.implementation import current; "
              "print(current(load_model(sys.argv[1], quantize='int4-group'))[''])")
    done = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split()[-1] == "moe_fx", done.stdout[-500:] + done.stderr[-2000:]


def test_a_bucketed_checkpoint_streams_as_loaded_padded(tmp_path) -> None:
    """A streamed prune of a bucketed source pads each layer as it is read: it writes what the in-memory prune of the
    source loaded padded writes (buckets again, where the widths still differ), tensor for tensor."""
    from test_streaming import _tensors

    from moe_fx import compose
    from moe_fx.passes import Calibrate, DropExperts, Score
    from moe_fx.run.streaming import stream_prune

    model = tiny_model("qwen3_moe")
    PruneChannels(plan=_two_widths(trace(model)))(model)
    source = save_checkpoint(model, tmp_path / "b")
    tokens = torch.randint(3, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    passes = lambda: [Calibrate(tokens, batch_size=2, show_progress=False), Score("frequency"), DropExperts(ratio=0.25)]
    streamed = stream_prune(source, tmp_path / "s", passes(), show_progress=False).out
    in_memory = save_checkpoint(compose(*passes())(load(source, ragged=False)), tmp_path / "m", source=source)
    a, b = _tensors(streamed), _tensors(in_memory)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(".buckets." in k for k in a)
    assert json.loads((streamed / "config.json").read_text()) == json.loads((in_memory / "config.json").read_text())


def test_a_bucket_no_pair_is_routed_to_is_skipped(tmp_path) -> None:
    """Decode often routes a token to one bucket only: the others are not called (moe-fx's kernels take no empty call)."""
    model = tiny_model("qwen3_moe")
    PruneChannels(plan=_two_widths(trace(model)))(model)
    out = save_checkpoint(model, tmp_path / "b")
    path = trace(model).blocks[0].experts.path
    bucketed, padded = (load(out, ragged=r).get_submodule(path) for r in (True, False))
    x = torch.randn(3, model.config.hidden_size)
    index = torch.tensor([[0, 2], [4, 6], [2, 0]])  # even experts: all in the narrow bucket
    weights = torch.rand(3, 2)
    torch.testing.assert_close(bucketed(x, index, weights), padded(x, index, weights), rtol=1e-5, atol=1e-6)
