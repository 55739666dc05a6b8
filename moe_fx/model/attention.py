"""Attention with sinks (GPT-OSS; in transformers 5.23 also MiMo-V2-Flash, GraniteMoE-SWA, HY-V4, Flint,
DeepSeek-V4 and openai-privacy-filter) through fused attention kernels, for calibration forwards.

transformers runs GPT-OSS's attention eagerly: its per-head sink logit joins the softmax's denominator, which SDPA
cannot express, so every layer materializes ``[B, heads, T, T]`` scores, concatenates the sinks, and softmaxes them:
25 of the 31 ms a batch of 4 x 2048 tokens takes in a streamed GPT-OSS-20B layer on an H100. A sink only rescales
each query's output: with ``lse`` the log-sum-exp of the query's scores, ``softmax([scores, sink])[:-1] @ V =
sigmoid(lse - sink) * softmax(scores) @ V``. So the fused kernels that also return ``lse`` (flash attention, or
memory-efficient attention where a mask is needed: sliding windows, padding) give the same output without the
scores: equal to eager in float32 (2e-7 relative on an H100, ``tests/test_attention.py``); in bfloat16 the two round
differently (the kernels' softmax is float32, eager's bfloat16) and differ from float32 by about as much as each other.

Calibration switches to it for its forward passes only (:func:`calibration_attention`); evaluation, export and the
saved model keep the model's own attention. Gradients, dropout and a query shorter than its keys without a mask (a
cached decode) go to the family's eager function: the kernels' ``lse`` has no gradient.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

NAME = "moe_fx_sinks"
"""The attention implementation name registered with transformers while calibration runs."""


def _has_sinks(model: nn.Module) -> bool:
    return any(isinstance(getattr(m, "sinks", None), nn.Parameter) for m in model.modules())


def _bias(mask: torch.Tensor, query: torch.Tensor, kv_length: int) -> torch.Tensor:
    """The additive float bias ``[B, heads, T, S]`` of a boolean (True: attend) or additive mask, its rows padded to a
    multiple of 16 elements as the memory-efficient kernel needs (the padding is sliced off: only the stride stays)."""
    mask = mask[..., :kv_length]
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(~mask, torch.finfo(query.dtype).min)
    else:
        bias = mask.to(query.dtype)
    bias = F.pad(bias, (0, -kv_length % 16))[..., :kv_length]
    return bias.expand(query.shape[0], query.shape[1], query.shape[2], kv_length)


def _fused(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None, causal: bool,
           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q k^T * scale + bias) v`` ``[B, heads, T, D]`` (causal: keys after the query masked) and the scores'
    log-sum-exp ``[B, heads, T]`` in float32."""
    if query.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, causal, attn_mask=bias, scale=scale)
    elif bias is None and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] % 8 == 0 and query.shape[-1] <= 256:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, causal, False, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, True, 0.0, causal, scale=scale)[:2]
    return out, lse[..., : query.shape[2]].float()


def sink_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                   scaling: float, dropout: float = 0.0, s_aux: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; the output ``[B, T, heads, D]`` as the family's eager function returns it."""
    t, s = query.shape[2], key.shape[2]
    # as transformers' SDPA path: no mask means causal unless the module says otherwise (a bidirectional encoder)
    causal = attention_mask is None and t > 1 and kwargs.get("is_causal", getattr(module, "is_causal", True))
    if dropout or (torch.is_grad_enabled() and query.requires_grad) or (causal and t != s):
        eager = sys.modules[type(module).__module__].eager_attention_forward
        return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, s_aux=s_aux, **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = (x.repeat_interleave(groups, dim=1) if groups > 1 else x for x in (key, value))
    bias = _bias(attention_mask, query, s) if attention_mask is not None else None
    out, lse = _fused(query, key, value, bias, bool(causal), scaling)
    if s_aux is not None:
        out = (out.float() * torch.sigmoid(lse - s_aux.float().view(1, -1, 1)).unsqueeze(-1)).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, sink_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


@contextlib.contextmanager
def calibration_attention(model: nn.Module) -> Iterator[bool]:
    """While inside, a model whose attention has sinks and runs eagerly runs it through :func:`sink_attention`; yields
    whether it does. Its masks are built as for SDPA (None where causal suffices), so the switch must cover the
    forward that builds them (a streamed run: from the embedding of the windows to the last layer)."""
    config = model.config
    if config._attn_implementation != "eager" or not _has_sinks(model):
        yield False
        return
    _register()
    config._attn_implementation = NAME  # the setter also sets the sub-configs
    try:
        yield True
    finally:
        config._attn_implementation = "eager"
