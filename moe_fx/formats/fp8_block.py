"""Block-wise FP8 expert weights in the hub's format (Qwen3-30B-A3B-FP8, DeepSeek-V3), which stock transformers
loads with its own fine-grained FP8 integration.

On disk every per-expert projection ``...experts.{e}.{proj}.weight`` becomes ``float8_e4m3fn`` with a
``...weight_scale_inv`` beside it: one float32 per 128 x 128 block (partial edge blocks allowed), the block's
largest magnitude over 448 (the format's largest value), which multiplies the stored codes back into the weight.
``config.json`` gets ``quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme":
"dynamic", "weight_block_size": [128, 128], "modules_to_not_convert": [...]}``; the list names every linear
layer and router that keeps the source dtype, so transformers converts exactly what is stored in FP8. On a GPU of compute capability 8.9+ transformers runs FP8 kernels; elsewhere it dequantizes to
bfloat16 on load.

Why hand-written rather than a library: the math is one scale per block and a cast, and the format must be the
hub's tensor names exactly (per-expert tensors, ``weight_scale_inv``), which transformers' own writer needs a GPU
to produce and torchao / compressed-tensors name differently.

What is quantized: the routed experts (nearly all of an MoE's bytes) by default, every other linear layer but
the routers and the head too with ``targets="linear"``, and the (untied) head with ``"linear+head"``
(:mod:`.quantized_checkpoint`); norms and embeddings stay in the source dtype.
"""

from __future__ import annotations

import torch

from moe_fx.kernels import quantized

BLOCK = quantized.FP8_BLOCK

SCALE_SUFFIX = "_scale_inv"


def quantization_config(not_converted: list[str]) -> dict:
    """``config.json``'s ``quantization_config`` of the scheme, with the layers that keep the source dtype."""
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK],
            "modules_to_not_convert": not_converted}


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [out, in]`` as ``float8_e4m3fn`` codes and float32 ``scale_inv [ceil(out/128), ceil(in/128)]``
    (the in-memory scheme's math, :mod:`moe_fx.kernels.quantized`, whose per-row scales repeat each block's)."""
    codes, per_row = quantized.quantize(weight, "fp8-block")
    return codes, per_row[::BLOCK].contiguous()


def dequantize(codes: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight the codes and scales stand for (what transformers computes with)."""
    return quantized.dequantize(codes, scale_inv.repeat_interleave(BLOCK, 0)[: codes.shape[0]], "fp8-block", dtype)


def encode(name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """One projection's stored tensors: the codes under its name, the scales beside them."""
    codes, scale = quantize(weight)
    return {name: codes, name + SCALE_SUFFIX: scale}


def decode(name: str, stored: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 weight :func:`encode`'s tensors stand for."""
    return dequantize(stored[name], stored[name + SCALE_SUFFIX])
