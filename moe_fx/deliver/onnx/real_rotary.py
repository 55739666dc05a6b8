"""Llama 4's rotary embedding in real numbers while a model is traced for ONNX.

transformers computes Llama 4's RoPE in complex numbers: the rotary module returns ``torch.polar`` angles and
attention multiplies ``view_as_complex`` pairs of the queries and keys by them. torch.onnx has no export for the
complex ``unsqueeze`` that broadcast does, so transformers' exporter stopped on every Llama 4. While
:func:`real_rotary` is active, the rotary module returns each angle's ``(cos, sin)`` as a real ``[..., D/2, 2]``
tensor and attention rotates each (even, odd) pair of channels with it: the products the complex multiply
computes (on the tiny model the logits differ from the complex path by 2.4e-7; the exported graph's parity check
runs against the stock model).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch import nn


def _rotary_forward(module: nn.Module, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """``Llama4TextRotaryEmbedding.forward`` with ``(cos, sin)`` in place of ``polar(1, angle)``, times the scaling."""
    angles = position_ids[..., None].float() * module.inv_freq.to(device=x.device, dtype=torch.float)
    return torch.stack([angles.cos(), angles.sin()], dim=-1) * module.attention_scaling


def _apply_rotary(xq: torch.Tensor, xk: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``modeling_llama4.apply_rotary_emb`` on real pairs: ``(a + ib)(c + is) = (ac - bs) + i(as + bc)``."""
    cos, sin = freqs[..., 0][:, :, None, :], freqs[..., 1][:, :, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        even, odd = pairs[..., 0], pairs[..., 1]
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(3).type_as(x)

    return rotate(xq), rotate(xk)


@contextlib.contextmanager
def real_rotary(model: nn.Module) -> Iterator[int]:
    """Run ``model``'s Llama 4 rotary embeddings in real numbers inside the block (yields how many modules; 0 and
    no change for other models); the stock forward and function are back afterwards, whatever happens."""
    from transformers.modeling_rope_utils import dynamic_rope_update
    from transformers.models.llama4 import modeling_llama4

    rotaries = [m for m in model.modules() if isinstance(m, modeling_llama4.Llama4TextRotaryEmbedding)]
    if not rotaries:
        yield 0
        return
    stock = modeling_llama4.apply_rotary_emb
    forward = torch.no_grad()(dynamic_rope_update(_rotary_forward))
    for m in rotaries:
        m.forward = types.MethodType(forward, m)
    modeling_llama4.apply_rotary_emb = _apply_rotary
    try:
        yield len(rotaries)
    finally:
        modeling_llama4.apply_rotary_emb = stock
        for m in rotaries:
            del m.forward
