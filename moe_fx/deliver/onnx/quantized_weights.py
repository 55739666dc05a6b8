"""Expert weights in ``com.microsoft.QMoE``'s integer format: symmetric, int8 per output row, int4 block-wise
along the input features.

For an ``[E, N, K]`` weight (``N`` outputs, ``K`` inputs), each row (int8) or each run of ``block_size`` inputs
of a row (int4) shares one scale ``max|w| / (2^(bits-1) - 1)``; values are stored as ``round(w / scale) + 2^(bits-1)`` (the operator's
default zero point, so no zero-point tensor), int4 two to a byte, the lower nibble first (``weights_prepacked=0``,
the raw layout). For int4 without a block size that divides both the hidden and the intermediate size, a
whole row shares one scale (the operator's column-wise mode).
"""

from __future__ import annotations

import numpy as np

WEIGHT_FORMATS = {"float": None, "int8": 8, "int4": 4}
"""``--weights`` of the ONNX export: the experts' precision in the fused node (bits of the integer formats)."""

BLOCK_SIZES = (128, 64, 32, 16)
"""Block sizes the operator takes (powers of two >= 16), largest first: the largest that divides both sizes."""


def block_size_for(fmt: str, hidden: int, inter: int) -> int:
    """The quantization block size of a block with these sizes; 0 for one scale per row.

    int8 keeps one scale per output row: onnxruntime's CPU kernel for block-wise 8-bit experts quantizes the
    activations to int8 as well (at every ``accuracy_level``), while per-row 8-bit weights are dequantized and
    multiplied in float, so the graph computes exactly with the dequantized weights. int4 needs blocks (a row's
    4-bit range is too coarse), and its CPU kernel keeps float activations."""
    if _bits(fmt) == 8:
        return 0
    return next((b for b in BLOCK_SIZES if hidden % b == 0 and inter % b == 0), 0)


def _bits(fmt: str) -> int:
    bits = WEIGHT_FORMATS.get(fmt)
    if bits is None:
        raise ValueError(f"{fmt!r} is not an integer weight format")
    return bits


def quantize_blocks(weight: np.ndarray, fmt: str, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``weight [E, N, K]`` as (``uint8 [E, N, K * bits / 8]``, float32 scales ``[E, N, K / block_size]`` or
    ``[E, N]`` when ``block_size`` is 0)."""
    bits = _bits(fmt)
    experts, rows, k = weight.shape
    block = block_size or k
    qmax = 2 ** (bits - 1) - 1
    blocks = weight.astype(np.float32).reshape(experts, rows, k // block, block)
    scales = np.abs(blocks).max(axis=-1) / qmax
    safe = np.where(scales > 0, scales, 1.0)[..., None]
    q = (np.clip(np.rint(blocks / safe), -qmax - 1, qmax) + 2 ** (bits - 1)).astype(np.uint8).reshape(experts, rows, k)
    if bits == 4:
        q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return q, scales if block_size else scales[..., 0]


def dequantize_blocks(q: np.ndarray, scales: np.ndarray, fmt: str, block_size: int, k: int) -> np.ndarray:
    """The float32 weights ``[E, N, K]`` the operator computes with from :func:`quantize_blocks`' output."""
    bits = _bits(fmt)
    if bits == 4:
        q = np.stack([q & 0x0F, q >> 4], axis=-1).reshape(*q.shape[:-1], k)
    values = q.astype(np.float32) - 2 ** (bits - 1)
    block = block_size or k
    scales = scales if block_size else scales[..., None]
    return (values.reshape(*values.shape[:-1], k // block, block) * scales[..., None]).reshape(values.shape)
