"""Integer expert weights in compressed-tensors' format (llm-compressor's output, which vLLM serves and stock
transformers loads with the ``compressed-tensors`` package installed).

Format ``pack-quantized``: each per-expert projection ``...experts.{e}.{proj}.weight`` is stored as
``weight_packed`` (int32 words of codes), ``weight_scale`` and ``weight_shape``.

- ``int8-channel``: 8-bit codes, four to a word; ``weight_scale [out, 1]``.
- ``int4-group``: 4-bit codes, eight to a word; ``weight_scale [out, in / group]``.

Both are symmetric: ``max|w| / 127``, and for int4 ``max|w| / 7`` clipped where that lowers the group's
rounding error (:func:`~moe_fx.kernels.quantized.clipped_scales`). The scales are kept in the checkpoint's
dtype, and the codes are rounded against those rounded scales, so the stored pair is exactly what loads.

``config.json`` gets compressed-tensors' ``quantization_config``: one config group whose target is
``Linear``. Every linear layer and router that keeps the source dtype is on its ``ignore`` list, so only the
routed experts, which transformers 5 fuses and vLLM reads per expert, take the scheme.

The library does the packing and writes the config (``compressed_tensors``' compressors and
``QuantizationConfig``): the layout is the library's own, so moe-fx does not re-implement it.
"""

from __future__ import annotations

import functools

import torch

from moe_fx.errors import BadOptionError
from moe_fx.kernels import quantized

FORMAT = "pack-quantized"
"""Both schemes' format: int32 words of packed codes (eight 4-bit or four 8-bit ones). compressed-tensors' own
``int-quantized`` format for 8-bit codes stores them under ``weight``, which transformers 5.23 does not
dequantize before fusing per-expert tensors (its load of such an MoE checkpoint fails); llm-compressor's W8A16
checkpoints are pack-quantized too."""
DEFAULT_GROUP = 128


def _library():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise BadOptionError("int8-channel / int4-group checkpoints are written in compressed-tensors' format: "
                             "pip install compressed-tensors (loading them in transformers needs it too)") from None
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    return PackedQuantizationCompressor, QuantizationArgs, QuantizationConfig, QuantizationScheme


@functools.cache
def scheme_of(name: str, group_size: int):
    """compressed-tensors' ``QuantizationScheme`` of ``name`` (``Linear`` targets, weights only)."""
    _, args, _, scheme = _library()
    if name == "int8-channel":
        weights = args(num_bits=8, type="int", symmetric=True, strategy="channel")
    else:
        weights = args(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
    return scheme(targets=["Linear"], weights=weights)


def group_fits(name: str, group_size: int, in_features: int) -> bool:
    """Whether scheme ``name``'s scale groups tile ``in_features`` inputs (only int4-group has groups)."""
    return name != "int4-group" or in_features % group_size == 0


def check_group(name: str, group_size: int, in_features: int, tensor: str) -> None:
    if not group_fits(name, group_size, in_features):
        raise BadOptionError(f"{tensor}: {in_features} is not a multiple of int4-group's group size {group_size}; "
                             f"use a group size that divides every expert's input size, or int8-channel / fp8-block")


def encode(name: str, group_size: int, key: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """One per-expert projection ``key`` as compressed-tensors stores it under scheme ``name``."""
    rows, k = weight.shape
    check_group(name, group_size, k, key)
    group = group_size if name == "int4-group" else k
    scale = quantized.group_scales(weight.float().unflatten(-1, (-1, group)), name)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(weight.dtype)  # stored, and quantized against
    stored = _library()[0].compress({"weight": weight, "weight_scale": scale}, scheme_of(name, group_size))
    prefix = key.removesuffix("weight")
    return {prefix + suffix: tensor for suffix, tensor in stored.items()}


def decode(name: str, group_size: int, key: str, stored: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 weight ``key``'s stored tensors stand for (the library's own decompression)."""
    prefix = key.removesuffix("weight")
    local = {k.removeprefix(prefix): v for k, v in stored.items() if k.startswith(prefix)}
    return _library()[0].decompress(local, scheme_of(name, group_size))["weight"].float()


def quantization_config(name: str, group_size: int, not_converted: list[str]) -> dict:
    """``config.json``'s ``quantization_config``: compressed-tensors' own serialisation of the scheme."""
    _, _, config, _ = _library()
    dumped = config(config_groups={"group_0": scheme_of(name, group_size)}, format=FORMAT, quantization_status="compressed",
                    ignore=not_converted).model_dump(exclude_none=True)
    return {**dumped, "quant_method": "compressed-tensors"}
