"""Quantized routed-expert weights in memory, which the moe_fx experts implementation multiplies as they are.

A quantized experts module keeps its projections under their usual names (``gate_up_proj`` / ``up_proj``,
``down_proj``) as integer or FP8 *codes* ``[E, N, K]`` (``N`` outputs, ``K`` inputs, whatever the family's
own layout: GPT-OSS's ``[E, in, out]`` is transposed when quantized), with float32 scales ``[E, N, ceil(K / G)]``
beside them (``<name>_scale``): input ``k`` of row ``n`` is ``code * scale[e, n, k // G]``. One layout for every
scheme keeps one kernel per path (:mod:`.triton_kernels`), which reads the codes and one scale per row and
``G`` inputs, never a dequantized copy:

- ``fp8-block``: ``float8_e4m3fn`` codes, one scale per 128 x 128 block (the hub's FP8 checkpoints), stored
  per row (each block's scale repeated over its rows, 3% of the codes' bytes at Qwen3-30B-A3B shapes) so that
  gate and up halves keep blocks of their own, exactly as a per-expert checkpoint's.
- ``int8-channel``: ``int8`` codes, one scale per output row.
- ``int4-group``: signed 4-bit codes in ``[-8, 7]`` stored with offset 8, two to a ``uint8`` (the even input in
  the low nibble, ``K / 2`` bytes a row), one scale per 128 inputs.

Symmetric scales (``max|w| / qmax``): no zero points, which keeps the kernels' inner loop one multiply. int4
groups clip their largest weights where that lowers the group's rounding error (:func:`clipped_scales`).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from moe_fx.errors import BadOptionError

SCALE_SUFFIX = "_scale"
"""The scales' buffer is the projection's name plus this."""

SCHEME_ATTR = "moe_fx_quantization"
"""The experts-module attribute naming its scheme (absent: dense weights)."""

FP8_MAX = 448.0
"""The largest finite ``float8_e4m3fn`` value."""

FP8_BLOCK = 128
"""Rows and inputs a block-wise FP8 scale covers."""


@dataclasses.dataclass(frozen=True)
class Scheme:
    """How one scheme stores codes: ``kernel`` is the Triton kernels' ``QUANT`` switch (1: codes load as numbers,
    2: 4-bit codes two to a byte); codes span ``[-qmax, qmax]`` (integers down to ``-qmax - 1``); ``group``
    inputs share a scale (``None``: the whole row); ``block_rows`` rows share it too (FP8 blocks); ``clip``: scales
    from :func:`clipped_scales` rather than ``max|w| / qmax``."""

    name: str
    kernel: int
    qmax: float
    group: int | None
    block_rows: int = 1
    fp8: bool = False
    clip: bool = False

    def group_size(self, in_features: int) -> int:
        return self.group or in_features


SCHEMES = {
    "fp8-block": Scheme("fp8-block", kernel=1, qmax=FP8_MAX, group=FP8_BLOCK, block_rows=FP8_BLOCK, fp8=True),
    "int8-channel": Scheme("int8-channel", kernel=1, qmax=127, group=None),
    "int4-group": Scheme("int4-group", kernel=2, qmax=7, group=128, clip=True),
}


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise BadOptionError(f"unknown quantization scheme {scheme!r}; use one of {', '.join(SCHEMES)}")


def relative_error(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """``|approximation - reference| / |reference|`` (Frobenius norms, in float32): what the records report."""
    ref = reference.float()
    return float((approximation.float() - ref).norm() / ref.norm().clamp_min(1e-30))


class QuantizedWeight(NamedTuple):
    """A quantized projection as the moe_fx paths read it: codes ``[E, N, K or K / 2]``, scales
    ``[E, N, ceil(K / G)]``, the scheme's name and whether the module's own layout is ``[E, in, out]``."""

    codes: torch.Tensor
    scale: torch.Tensor
    scheme: str
    transposed: bool

    @property
    def in_features(self) -> int:
        return self.codes.shape[-1] * (2 if SCHEMES[self.scheme].kernel == 2 else 1)

    @property
    def shape(self) -> torch.Size:
        """The dense weight's shape in the module's own layout."""
        e, n = self.codes.shape[:2]
        return torch.Size((e, self.in_features, n) if self.transposed else (e, n, self.in_features))

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def gather(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The experts ``index`` dequantized to ``dtype`` in the module's own layout (``[U, out, in]``, or
        ``[U, in, out]`` when transposed): the reference path reads only the experts it runs."""
        w = dequantize(self.codes.index_select(0, index), self.scale.index_select(0, index), self.scheme, dtype)
        return w.transpose(-2, -1) if self.transposed else w


def quantize(weight: torch.Tensor, scheme: str, segments: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [..., N, K]`` as (codes, float32 scales ``[..., N, ceil(K / G)]``) of ``scheme``. ``segments``
    splits the rows into runs quantized apart (fp8-block: gate and up halves of a fused projection get blocks of
    their own, as the hub's per-expert tensors have); the default is one run."""
    spec = SCHEMES[scheme]
    rows, k = weight.shape[-2:]
    if spec.kernel == 2 and k % 2:
        raise ValueError(f"{scheme} packs two inputs a byte and needs an even input size; this projection has {k}")
    group = spec.group_size(k)
    w = weight.float()
    groups = torch.nn.functional.pad(w, (0, -k % group)).unflatten(-1, (-1, group))  # [..., N, groups, group]
    if spec.block_rows > 1:
        amax = groups.abs().amax(-1)
        scale = torch.cat([_block_rows_max(part, spec.block_rows) for part in amax.split(list(segments or (rows,)), dim=-2)], dim=-2) / spec.qmax
    else:
        scale = group_scales(groups, scheme)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).repeat_interleave(group, -1)[..., :k]
    if spec.fp8:
        return (w / safe).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale
    q = torch.round(w / safe).clamp(-spec.qmax - 1, spec.qmax)
    if spec.kernel == 1:
        return q.to(torch.int8), scale
    q = (q + 8).to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4), scale


def group_scales(groups: torch.Tensor, scheme: str) -> torch.Tensor:
    """``scheme``'s scales of ``groups [..., G]`` (float32) whose rows do not share blocks: :func:`clipped_scales`
    where the scheme clips, else ``max|w| / qmax``; zero groups get 0. The in-memory codes and the checkpoint
    writers (:mod:`moe_fx.formats.compressed_experts`) both take their scales from here."""
    spec = SCHEMES[scheme]
    return clipped_scales(groups, spec.qmax) if spec.clip else groups.abs().amax(-1) / spec.qmax


CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(13))
"""Fractions of a group's largest magnitude :func:`clipped_scales` tries as its code range (1.0 down to 0.7)."""


def clipped_scales(groups: torch.Tensor, qmax: float) -> torch.Tensor:
    """Symmetric scales of ``groups [..., G]`` for integer codes in ``[-qmax - 1, qmax]``: ``max|w| / qmax`` times
    the ratio of :data:`CLIP_RATIOS` whose rounded group has the least squared error; clipping a group's few
    largest weights buys finer steps for the rest (llm-compressor's MSE observer does the same search). On
    qwen3moe-bench, int4 experts add 0.0093 mean NLL instead of 0.0112 with plain ``max|w| / qmax``. Groups of
    zeros get scale 0."""
    groups = groups.float()
    amax = groups.abs().amax(-1)
    best_scale, best_error = amax / qmax, None
    for ratio in CLIP_RATIOS:
        scale = amax * (ratio / qmax)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
        error = (torch.round(groups / safe).clamp(-qmax - 1, qmax) * safe - groups).square().sum(-1)
        if best_error is None:
            best_error = error
            continue
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
    return best_scale


def _block_rows_max(amax: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-row maxima ``[..., N, G]`` -> each run of ``rows`` rows' maximum, repeated over its rows."""
    n = amax.shape[-2]
    padded = torch.nn.functional.pad(amax, (0, 0, 0, -n % rows))
    return padded.unflatten(-2, (-1, rows)).amax(-2).repeat_interleave(rows, -2)[..., :n, :]


def dequantize(codes: torch.Tensor, scale: torch.Tensor, scheme: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weights ``[..., N, K]`` that codes and scales stand for."""
    spec = SCHEMES[scheme]
    if spec.kernel == 2:
        # one broadcast shift, not a stack of the two nibbles: Inductor (torch 2.13, CPU) miscompiles that stack
        shifts = torch.tensor([0, 4], dtype=torch.uint8, device=codes.device)
        values = ((codes.unsqueeze(-1) >> shifts) & 0x0F).reshape(*codes.shape[:-1], -1).to(torch.int16) - 8
    else:
        values = codes
    k = values.shape[-1]
    group = spec.group_size(k)
    return (values.float() * scale.repeat_interleave(group, -1)[..., :k]).to(dtype)

