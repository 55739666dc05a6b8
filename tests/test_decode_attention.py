"""``moe_fx::decode_attention`` swapped in for a decode step's ``scaled_dot_product_attention``: which calls
qualify, real families' decode graphs rewired (same logits with the operator computed by torch), the kernel's
arithmetic in Triton's interpreter (float32 and float16: the interpreter has no bfloat16 arithmetic) and, on a
GPU, compiled tiny models' decode steps against eager."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import NO_INTERPRETER, interpreter_env
from torch._subclasses.fake_tensor import FakeTensorMode

from moe_fx.kernels import decode_attention, grouped_mm


@pytest.fixture
def with_triton(monkeypatch):
    monkeypatch.setattr(grouped_mm, "triton_available", lambda: True)


def _fake(*shape, dtype=torch.float16, device="cuda"):
    with FakeTensorMode(allow_non_fake_inputs=True):
        return torch.empty(shape, dtype=dtype, device=device)


def _call(q=(2, 8, 1, 64), k=(2, 2, 40, 64), v=(2, 2, 40, 64), mask=(2, 1, 1, 40), **kw):
    args = dict(dropout=0.0, causal=False, gqa=True) | kw
    mask_dtype = args.pop("mask_dtype", torch.bool)
    device = args.pop("device", "cuda")
    tensors = [_fake(*s, device=device) for s in (q, k, v)]
    return decode_attention.eligible(*tensors, None if mask is None else _fake(*mask, dtype=mask_dtype, device=device), **args)


def test_decode_calls_qualify(with_triton) -> None:
    assert _call()
    assert _call(mask=None)
    assert _call(mask=(1, 1, 1, 40), mask_dtype=torch.float16)  # additive, broadcast over the batch
    assert _call(q=(2, 2, 1, 64), gqa=False)  # one query head per key/value head
    assert _call(k=(2, 2, 40, 192), q=(2, 8, 1, 192), v=(2, 2, 40, 128))  # MLA: value heads narrower


@pytest.mark.parametrize("change", [
    {"device": "cpu"},
    {"q": (2, 8, 7, 64)},  # a prefill: several queries a row
    {"causal": True},  # with one query, is_causal attends to the first slot only
    {"dropout": 0.1},
    {"gqa": False},  # grouped heads without enable_gqa: SDPA itself refuses
    {"q": (2, 6, 1, 64), "k": (2, 4, 40, 64), "v": (2, 4, 40, 64)},  # 6 query heads over 4 key/value heads
    {"mask": (2, 8, 1, 40)},  # a mask per head
    {"mask": (2, 1, 1, 40), "mask_dtype": torch.float32},  # another dtype than the query's
    {"q": (2, 8, 1, 512), "k": (2, 2, 40, 512), "v": (2, 2, 40, 512)},  # wider than the kernel's registers
])
def test_other_calls_stay(with_triton, change) -> None:
    assert not _call(**change)


def test_no_triton_no_replacement(monkeypatch) -> None:
    monkeypatch.setattr(grouped_mm, "triton_available", lambda: False)
    assert not _call()


def _reference(q, k, v, mask, scale):
    """What ``moe_fx::decode_attention`` computes, in torch."""
    group = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask, scale=scale)


# (family, config overrides, transformers' GQA switch, SDPA calls a decode step makes: 2 layers, or none where
# attention is not SDPA, key/value heads the operator reads)
DECODE_GRAPHS = [
    ("qwen3_moe", {"num_key_value_heads": 2}, "1", 2, 2),  # grouped-query heads, SDPA's enable_gqa
    ("qwen3_moe", {"num_key_value_heads": 2}, "0", 2, 2),  # the cache repeated per query head (repeat_kv): read unrepeated
    ("mixtral", {}, "1", 2, 4),
    ("olmoe", {}, "0", 2, 4),
    ("deepseek_v2", {}, "1", 2, 4),  # MLA: the value heads are a slice (strided)
    ("gpt_oss", {}, "1", 0, None),  # sinks: transformers' eager attention, no SDPA call
]


@pytest.mark.parametrize(("family", "overrides", "switch", "calls", "kv_heads"), DECODE_GRAPHS)
def test_decode_graphs_of_real_families(with_triton, monkeypatch, family, overrides, switch, calls, kv_heads) -> None:
    """Each family's static-cache decode step as Dynamo captures it: its attention calls are replaced, reading the
    cache's own key/value heads (also where transformers repeated them per query head: those copies leave the graph),
    and the rewritten graph, with the operator computed by torch, returns the same logits."""
    from captured_graphs import captured_on_cuda
    from tiny_models import tiny_model

    import moe_fx

    monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", switch)  # "1": SDPA's own grouped heads (enable_gqa) with a mask
    model = tiny_model(family, **overrides).eval()
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    cache = moe_fx.static_cache(model.config, 24, rolling_windows=True)
    with torch.no_grad():
        model(input_ids=ids[:, :8], past_key_values=cache, cache_position=torch.arange(8), use_cache=True)
        gm, inputs = captured_on_cuda(model, input_ids=ids[:, 8:], past_key_values=cache, cache_position=torch.tensor([8]), use_cache=True)
        before = [t.clone() if isinstance(t, torch.Tensor) else t for t in inputs]
        want = gm(*inputs)
        for tensor, value in zip(inputs, before):  # the step wrote the cache: the second run starts where the first did
            if isinstance(tensor, torch.Tensor):
                tensor.copy_(value)
        assert decode_attention.replace_decode_attention(gm) == calls
        fused = [n for n in gm.graph.nodes if n.target is torch.ops.moe_fx.decode_attention.default]
        assert len(fused) == calls
        assert all(n.args[1].meta["example_value"].shape[1] == kv_heads == n.args[2].meta["example_value"].shape[1] for n in fused)
        repeats = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "expand" and n.meta["example_value"].ndim == 5]
        assert not repeats  # no copy of the cache per query head is left
        for node in fused:
            node.target = _reference
        gm.recompile()
        got = gm(*inputs)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


SCRIPT = r"""
import torch
from moe_fx.kernels import triton_attention as ta

ta.wrap_triton = lambda kernel: kernel  # the interpreter launches kernels itself
torch.manual_seed(0)


def reference(q, k, v, mask, scale):
    group = q.shape[1] // k.shape[1]
    m = None if mask is None else mask[:, None, None, :]
    m = m if m is None or m.dtype == torch.bool else m.float()
    return torch.nn.functional.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(group, 1),
                                                            v.float().repeat_interleave(group, 1), attn_mask=m, scale=scale)


# (batch, query heads, key/value heads, slots, key dim, value dim, mask, forced splits, dtype, tolerance)
for b, hq, hkv, length, dk, dv, kind, parts, dtype, tol in [
    (2, 8, 2, 37, 16, 16, "bool", None, torch.float32, 1e-5),
    (1, 4, 4, 70, 24, 20, "none", None, torch.float32, 1e-5),  # no groups; head dims not powers of two, k != v
    (3, 6, 3, 130, 32, 32, "float", None, torch.float32, 1e-5),  # an additive mask
    (2, 8, 2, 300, 16, 16, "bool", 3, torch.float32, 1e-5),  # split cache, combined by the second kernel
    (1, 2, 1, 300, 16, 16, "empty", 5, torch.float32, 1e-5),  # whole splits masked out
    (2, 8, 2, 150, 32, 32, "bool", None, torch.float16, 3e-3),
    (2, 8, 2, 300, 32, 32, "empty", 4, torch.float16, 3e-3),
]:
    q = torch.randn(b, 1, hq, dk).transpose(1, 2).to(dtype)  # strided as transformers hands it
    k = torch.randn(b, hkv, length + 5, dk)[:, :, :length].to(dtype)  # a view into a longer cache
    v = torch.randn(b, hkv, length, dv + 3)[..., :dv].to(dtype)  # a slice, as MLA's values
    mask = None
    if kind in ("bool", "empty"):
        mask = torch.rand(b, length) > 0.3
        mask[:, 0] = True
        if kind == "empty":
            mask[:, 64:280] = False
    elif kind == "float":
        mask = torch.where(torch.rand(b, length) > 0.3, 0.0, float("-inf")) + torch.randn(b, length) * 0.1
        mask[:, 0] = 0.0
    got = ta.triton_decode_attention(q, k, v, mask, 0.3, parts=parts)
    assert got.shape == (b, hq, 1, dv) and got.dtype == dtype, (got.shape, got.dtype)
    err = (got.float() - reference(q, k, v, mask, 0.3)).abs().max().item()
    assert err < tol, (b, hq, hkv, length, kind, parts, dtype, err)
assert ta.splits(4, 152, 132) == 1  # a short cache: one pass, no second kernel
assert ta.splits(4, 32768, 132) == 66  # long: two programs a multiprocessor
assert ta.splits(256, 32768, 132) == 2  # many rows and heads fill the GPU already
assert ta.split_length(32768, 66, 64) == 512 and ta.split_length(300, 4, 64) == 128  # whole blocks: 64 parts, 3 parts
print("ok")
"""


@pytest.mark.skipif(interpreter_env() is None, reason=NO_INTERPRETER)
def test_kernel_in_interpreter() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=interpreter_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/test_gpu.sh)")
@pytest.mark.parametrize(("family", "overrides", "dtype", "switch"), [
    ("qwen3_moe", {"num_key_value_heads": 2}, torch.bfloat16, "1"), ("qwen3_moe", {"num_key_value_heads": 2}, torch.float32, "1"),
    ("qwen3_moe", {"num_key_value_heads": 2}, torch.float32, "0"),  # the cache repeated per query head: read unrepeated
    ("deepseek_v2", {}, torch.bfloat16, "1"), ("mixtral", {}, torch.float16, "1")])
def test_compiled_decode_on_cuda_matches_eager(monkeypatch, family, overrides, dtype, switch) -> None:
    """``moe_fx.compile`` on a GPU: a static-cache decode step runs its attention on the kernel and its logits
    match the eager step's (float32 closely; 16-bit within rounding of the largest logit)."""
    from tiny_models import tiny_model

    import moe_fx
    from moe_fx.deliver import compile as compile_module

    monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", switch)
    seen = []
    monkeypatch.setattr(compile_module, "replace_decode_attention",
                        lambda gm: seen.append(decode_attention.replace_decode_attention(gm)) or seen[-1])
    model = tiny_model(family, **overrides).to("cuda", dtype).eval()
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (3, 9), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    caches = [moe_fx.static_cache(model.config, 64, rolling_windows=True) for _ in range(2)]  # one a run: a step is not idempotent

    def prefilled_step(cache) -> dict:
        model(input_ids=ids[:, :8], past_key_values=cache, cache_position=torch.arange(8, device="cuda"), use_cache=True)
        return dict(input_ids=ids[:, 8:], past_key_values=cache, cache_position=torch.tensor([8], device="cuda"), use_cache=True)

    with torch.no_grad():
        want = model(**prefilled_step(caches[0])).logits.float()
        torch._dynamo.reset()
        got = moe_fx.compile(model)(**prefilled_step(caches[1])).logits.float()
    assert sum(seen) == 2
    tol = 1e-4 if dtype == torch.float32 else 0.02 * want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=0, atol=tol)
