"""Attention with sinks through fused kernels (calibration only): the same output as GPT-OSS's eager attention."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TINY_FAMILIES, tiny_model
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

from moe_fx.model.attention import _has_sinks, calibration_attention, sink_attention

IDS = torch.randint(3, 100, (3, 40), generator=torch.Generator().manual_seed(0))
PADDED = torch.ones_like(IDS)
PADDED[0, :5] = 0  # the first sequence left-padded


@pytest.fixture(scope="module")
def gpt_oss():
    return tiny_model("gpt_oss").eval()


@pytest.mark.parametrize("mask", [None, "padded"])
def test_gpt_oss_logits_match_eager(gpt_oss, mask):
    """Sliding-window and full layers, with and without left padding (float32: the same up to rounding)."""
    attention_mask = None if mask is None else PADDED
    with torch.no_grad():
        ref = gpt_oss(input_ids=IDS, attention_mask=attention_mask).logits
        with calibration_attention(gpt_oss) as switched:
            assert switched and gpt_oss.config._attn_implementation == "moe_fx_sinks"
            out = gpt_oss(input_ids=IDS, attention_mask=attention_mask).logits
    assert gpt_oss.config._attn_implementation == "eager"
    valid = torch.ones_like(IDS, dtype=torch.bool) if mask is None else PADDED.bool()
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-5, atol=1e-5)


def test_every_family_with_sinks_matches_eager():
    """Each tiny family whose attention has sinks (causal decoders, sliding windows, and a bidirectional encoder:
    openai_privacy_filter, where no mask means full attention) gives eager's float32 logits."""
    checked = []
    for family in TINY_FAMILIES:
        model = tiny_model(family).eval()
        if not _has_sinks(model):
            continue
        with torch.no_grad():
            ref = model(input_ids=IDS[:2]).logits
            with calibration_attention(model):
                out = model(input_ids=IDS[:2]).logits
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=family)
        checked.append(family)
    assert {"gpt_oss", "openai_privacy_filter", "mimo_v2_flash"} <= set(checked), checked


class _Attention(torch.nn.Module):
    """What the attention functions read of the module: the KV groups and the sinks."""

    def __init__(self, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.num_key_value_groups, self.training = heads // kv_heads, False
        self.sinks = torch.nn.Parameter(torch.randn(heads, generator=torch.Generator().manual_seed(1)))


def _qkv(t: int, s: int, requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(t * 100 + s)
    q, k, v = torch.randn(2, 4, t, 16, generator=g), torch.randn(2, 2, s, 16, generator=g), torch.randn(2, 2, s, 16, generator=g)
    return q.requires_grad_(requires_grad), k, v


@pytest.mark.parametrize("t, s, mask", [
    (12, 12, "window"),  # a sliding window as a boolean mask (the SDPA mask format)
    (12, 12, "additive"),  # the eager format
    (1, 12, None),  # one query, no mask: attends every key
    (5, 12, "window"),  # a chunk after cached keys
])
def test_function_matches_eager(t, s, mask):
    module = _Attention(4, 2)
    q, k, v = _qkv(t, s)
    pos_q, pos_k = torch.arange(s - t, s)[:, None], torch.arange(s)[None, :]
    allowed = (pos_k <= pos_q) & (pos_k > pos_q - 4)
    additive = torch.zeros(t, s).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None].expand(2, 1, t, s)
    given = {None: None, "window": allowed[None, None].expand(2, 1, t, s), "additive": additive}[mask]
    ref, _ = eager_attention_forward(module, q, k, v, None if mask is None else additive, scaling=0.25, s_aux=module.sinks)
    out, _ = sink_attention(module, q, k, v, given, scaling=0.25, s_aux=module.sinks)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_gradients_and_causal_cache_chunks_fall_back_to_eager():
    """The kernels' log-sum-exp has no gradient, and a chunk after cached keys without a mask is not top-left causal."""
    module = _Attention(4, 2)
    for t, s, grad in ((12, 12, True), (5, 12, False)):
        q, k, v = _qkv(t, s, grad)
        with torch.set_grad_enabled(grad):
            ref, _ = eager_attention_forward(module, q, k, v, None, scaling=0.25, s_aux=module.sinks)
            out, _ = sink_attention(module, q, k, v, None, scaling=0.25, s_aux=module.sinks)
        assert torch.equal(out, ref)


def test_models_without_sinks_are_left_alone():
    model = tiny_model("qwen3_moe")
    before = model.config._attn_implementation
    with calibration_attention(model) as switched:
        assert not switched and model.config._attn_implementation == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels (flash, memory-efficient)")
@pytest.mark.parametrize("padded", [False, True])  # without padding the full-attention layer takes the flash kernel
def test_cuda_kernels_match_eager_and_round_less(padded):
    """On the GPU: float32 equals eager. In bfloat16 both differ from float32 (the MoE's routing amplifies rounding):
    the fused path by about as much as eager does (1.02x and 1.21x eager's difference on an H100)."""
    model = tiny_model("gpt_oss").eval().cuda()
    ids = torch.randint(3, 100, (2, 300), generator=torch.Generator().manual_seed(0)).cuda()  # longer than the window (128)
    mask = torch.ones_like(ids)
    mask[0, :7] = int(not padded)
    outputs = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            model.to(dtype)
            runs = [model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1:]]
            with calibration_attention(model):
                runs.append(model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1:])
            outputs[dtype] = [torch.cat([h[mask.bool()].float() for h in hidden]) for hidden in runs]
    eager32, fused32 = outputs[torch.float32]
    torch.testing.assert_close(fused32, eager32, rtol=1e-4, atol=1e-4)
    eager16, fused16 = outputs[torch.bfloat16]
    assert (fused16 - eager32).norm() <= 1.5 * (eager16 - eager32).norm()
