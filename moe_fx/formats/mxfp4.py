"""MXFP4 expert weights, the format GPT-OSS checkpoints ship their routed experts in.

On disk a fused experts tensor ``experts.gate_up_proj`` (``[E, in, out]`` in the model) is stored as
``experts.gate_up_proj_blocks`` (``[E, out, in / 32, 16]`` uint8: two 4-bit E2M1 codes per byte, the even element
in the low nibble) and ``experts.gate_up_proj_scales`` (``[E, out, in / 32]`` uint8: one power of two per block of
32, biased by 127), with ``quantization_config = {"quant_method": "mxfp4", ...}`` in ``config.json``; the same for
``down_proj``. transformers dequantizes it to bfloat16 on load where it has no MXFP4 kernel (the CPU, or without
Triton), and :mod:`moe_fx.formats.lazy` does the same when streaming.

Why write it back: a pruned GPT-OSS should stay the size its users expect (MXFP4 experts are about a quarter of
bfloat16's bytes). Dropping experts keeps each kept expert's values exactly, and :func:`quantize` is exact on
values that came from MXFP4 (each block's scale is the smallest power of two that fits its largest value, and
every value of such a block is a code of that scale); weights a pass changed (compensation, merging, channel
removal's compensation, distillation) are rounded to the nearest code, and :func:`quantization_error` says how much.
"""

from __future__ import annotations

import torch

BLOCK = 32
"""Values per block (one shared scale)."""

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""Magnitudes of the 4-bit codes 0-7; codes 8-15 are their negatives (the sign bit)."""

SUFFIXES = ("_blocks", "_scales")
EXPERT_TENSORS = ("experts.gate_up_proj", "experts.down_proj")
"""The fused expert tensors GPT-OSS stores in MXFP4 (their biases stay in bfloat16)."""


def is_mxfp4(config) -> bool:
    """Whether a config (object or ``config.json`` dict) declares MXFP4 weights."""
    q = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    q = q.to_dict() if hasattr(q, "to_dict") else q
    return isinstance(q, dict) and q.get("quant_method") == "mxfp4"


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``[E, out, G, 16]`` codes and ``[E, out, G]`` scales -> the model's ``[E, in, out]`` weight (``in = 32 G``),
    one expert at a time (the index tensors of a whole GPT-OSS-20B layer would take 10 GB)."""
    lut = torch.tensor(E2M1 + tuple(-v for v in E2M1), dtype=torch.float32, device=blocks.device)
    e, n, g, _ = blocks.shape
    out = torch.empty(e, g * BLOCK, n, dtype=dtype, device=blocks.device)
    for i in range(e):
        codes = torch.stack([blocks[i] & 0x0F, blocks[i] >> 4], dim=-1).to(torch.long)  # even element first
        values = lut[codes].flatten(-3)  # [out, G * 32]
        exponent = (scales[i].to(torch.int32) - 127).repeat_interleave(BLOCK, dim=-1)
        out[i] = torch.ldexp(values, exponent.to(values.dtype)).T.to(dtype)
    return out


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's ``[E, in, out]`` weight -> (``[E, out, in / 32, 16]`` codes, ``[E, out, in / 32]`` scales): per block
    of 32 input values the smallest power of two ``2^k`` with ``max |w| / 2^k <= 6``, each value rounded to the
    nearest E2M1 code (ties to the smaller magnitude)."""
    e, k, n = weight.shape
    if k % BLOCK:
        raise ValueError(f"MXFP4 needs the input size to be a multiple of {BLOCK}; got {k}")
    magnitudes = torch.tensor(E2M1, device=weight.device)
    midpoints = (magnitudes[1:] + magnitudes[:-1]) / 2
    blocks = torch.empty(e, n, k // BLOCK, BLOCK // 2, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(e, n, k // BLOCK, dtype=torch.uint8, device=weight.device)
    for i in range(e):  # one expert at a time: the index tensors are 8 bytes a value
        w = weight[i].detach().float().T.reshape(n, k // BLOCK, BLOCK)
        exponent = torch.ceil(torch.log2(w.abs().amax(dim=-1).clamp(min=2.0**-126) / 6.0)).clamp(-127, 128)
        scaled = (w / torch.exp2(exponent).unsqueeze(-1)).abs().contiguous()
        index = torch.bucketize(scaled, midpoints)  # nearest magnitude; a value on a midpoint goes to the lower one
        codes = (index + 8 * (w < 0)).to(torch.uint8).view(n, k // BLOCK, BLOCK // 2, 2)
        blocks[i] = codes[..., 0] | (codes[..., 1] << 4)
        scales[i] = (exponent + 127).to(torch.uint8)
    return blocks, scales


def quantization_error(weight: torch.Tensor) -> float:
    """Relative Frobenius error of ``weight`` after an MXFP4 round trip (0 for values that came from MXFP4)."""
    return _round_trip_error(weight, *quantize(weight))


def _round_trip_error(weight: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> float:
    """Relative Frobenius error of ``weight`` against its MXFP4 ``blocks`` and ``scales``."""
    back = dequantize(blocks, scales, dtype=torch.float32)
    w = weight.detach().float()
    return float((back - w).norm() / w.norm().clamp(min=1e-30))


def pack_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """``state`` (checkpoint names) with every fused GPT-OSS expert weight replaced by its MXFP4 blocks and
    scales; also the relative round-trip error per packed tensor."""
    out, errors = {}, {}
    for name, t in state.items():
        # transformers saves a GPT-OSS it dequantized on load with its weights under the "_blocks" names (the
        # reverse of its dequantizing conversion renames only): a float "_blocks" tensor is a dequantized weight
        if name.endswith("_blocks") and t.is_floating_point() and name[: -len("_blocks")].endswith(EXPERT_TENSORS):
            name = name[: -len("_blocks")]
        if name.endswith(EXPERT_TENSORS) and t.dim() == 3:
            blocks, scales = quantize(t)
            out[f"{name}_blocks"], out[f"{name}_scales"] = blocks, scales
            errors[name] = _round_trip_error(t, blocks, scales)
        else:
            out[name] = t
    return out, errors


def unpacked_name(name: str) -> str | None:
    """``...experts.gate_up_proj`` for ``...experts.gate_up_proj_blocks`` / ``_scales``; None for other names."""
    for suffix in SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)].endswith(EXPERT_TENSORS):
            return name[: -len(suffix)]
    return None


def unpack_state(state: dict, device: str | torch.device = "cpu") -> dict:
    """``state`` (checkpoint names -> tensors or safetensors slices) with every MXFP4 blocks/scales pair replaced by
    the dequantized bfloat16 weight under the model's name (what transformers' loader expects of a dequantized
    GPT-OSS). The codes are moved to ``device`` first and expanded there: on a GPU that is milliseconds a layer,
    on the CPU seconds (a GPT-OSS-20B layer's experts are 1.2 G values)."""
    out, pairs = {}, {}
    for name, value in state.items():
        base = unpacked_name(name)
        if base is None:
            out[name] = value
        else:
            pairs.setdefault(base, {})[name[len(base):]] = (value if isinstance(value, torch.Tensor) else value[:]).to(device)
    for base, parts in pairs.items():
        if set(parts) != set(SUFFIXES):
            raise ValueError(f"{base}: MXFP4 needs both {base}_blocks and {base}_scales; the checkpoint has {sorted(parts)}")
        out[base] = dequantize(parts["_blocks"], parts["_scales"])
    return out


def repack_directory(path, quantization_config: dict) -> dict:
    """Rewrite a saved checkpoint's fused expert weights as MXFP4, in place: every shard, the index's weight map and
    total size, and ``quantization_config`` in ``config.json``. Returns what the record keeps: bytes before and
    after, the number of tensors packed and the largest relative round-trip error."""
    from pathlib import Path

    from moe_fx.formats.shards import rewrite_shards, set_quantization_config

    errors: dict[str, float] = {}

    def pack(state: dict) -> dict:
        packed, errs = pack_state(state)
        errors.update(errs)
        return packed

    before, after = rewrite_shards(Path(path), pack)
    set_quantization_config(Path(path), quantization_config)
    return {"format": "mxfp4", "tensors": len(errors), "bytes_unpacked": before, "bytes": after,
            "max_relative_error": max(errors.values(), default=0.0)}
