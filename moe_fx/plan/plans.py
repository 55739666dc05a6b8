"""PrunePlan: the one object that says what a rewrite keeps.

Everything that changes a model goes through a plan, so the same plan can be applied in memory, streamed
layer by layer, recorded in ``moe_fx.json`` and re-applied to another copy of the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moe_fx.errors import BadOptionError
from moe_fx.model.spec import MoEBlockSpec, MoEModelSpec


@dataclass
class PrunePlan:
    """Per block (module path), the original ids of the experts to keep, in their new order."""

    kept_experts: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def keep_all(cls, spec: MoEModelSpec) -> PrunePlan:
        return cls({b.path: list(range(b.num_experts)) for b in spec.blocks})

    def to_dict(self) -> dict:
        return {"kept_experts": {k: list(map(int, v)) for k, v in self.kept_experts.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> PrunePlan:
        return cls({k: [int(i) for i in v] for k, v in data["kept_experts"].items()})

    def then(self, later: PrunePlan) -> PrunePlan:
        """The plan equal to applying ``self`` and then ``later`` (whose ids index ``self``'s kept experts)."""
        out = {}
        for path, kept in self.kept_experts.items():
            out[path] = [kept[i] for i in later.kept_experts[path]] if path in later.kept_experts else list(kept)
        return PrunePlan(out)

    def validate(self, spec: MoEModelSpec) -> None:
        """Raise :class:`BadOptionError` naming the first block whose kept set the model cannot run."""
        unknown = set(self.kept_experts) - {b.path for b in spec.blocks}
        if unknown:
            raise BadOptionError(f"plan names blocks the model does not have: {sorted(unknown)[:3]}")
        for block in spec.blocks:
            kept = self.kept_experts.get(block.path)
            if kept is not None:
                _validate_block(block, kept)


def _validate_block(block: MoEBlockSpec, kept: list[int]) -> None:
    e, k = block.num_experts, block.top_k
    if len(set(kept)) != len(kept) or any(not 0 <= i < e for i in kept):
        raise BadOptionError(f"{block.path}: kept expert ids must be distinct and in [0, {e}), got {kept}")
    if len(kept) < k:
        raise BadOptionError(
            f"{block.path}: keeping {len(kept)} of {e} experts leaves fewer than top-k={k}; "
            f"keep at least {k} experts (lower the ratio to at most {1 - k / e:.3f})"
        )
    groups = block.router.n_group
    if groups and groups > 1:
        size = e // groups
        per_group = [sum(1 for i in kept if i // size == g) for g in range(groups)]
        contiguous = [i // size for i in kept] == sorted(i // size for i in kept)
        if len(set(per_group)) != 1 or not contiguous:
            raise BadOptionError(
                f"{block.path}: group-limited routing (n_group={groups}) needs the same number of kept experts in "
                f"every group, listed group by group; got per-group counts {per_group}"
            )
        if per_group[0] < 2:
            raise BadOptionError(f"{block.path}: group-limited routing scores each group by its top-2; keep >= 2 per group")


def _mask_hex(ids: list[int], width: int) -> str:
    bits = 0
    for i in ids:
        bits |= 1 << i
    return format(bits, f"0{(width + 3) // 4}x")


def _hex_ids(mask: str) -> list[int]:
    bits = int(mask, 16)
    return [i for i in range(bits.bit_length()) if bits >> i & 1]


WIDTH_ALIGN = 8
"""Stored expert widths are multiples of 8: grouped_mm needs 16-byte strides (8 bf16 values)."""


def width_step(width: int, align: int) -> int:
    """The step of a pruned width of an expert ``width`` channels wide: ``align`` when the expert is wider than
    ``align``, else :data:`WIDTH_ALIGN`. A format whose blocks span ``align`` channels (fp8-block's 128) stores a
    dimension of at most one block, or a multiple of blocks; a width already within one block stays within it."""
    return align if width > align else WIDTH_ALIGN


@dataclass
class ChannelPlan:
    """Per block, for each of its current experts, the intermediate channels (neurons) to keep.

    An expert keeping no channel is dropped, router row too. The stored width of a block is the kept count
    when all its experts keep the same number, else the largest kept count rounded up to ``multiple`` (at
    most the original width): the narrower experts are zero-padded, which changes no output, so one fused
    tensor per block still holds them and stock experts kernels run unchanged. ``align``: stored widths are
    multiples of :func:`width_step` (``align`` for experts wider than it: fp8-block's 128 x 128 blocks).
    """

    kept_channels: dict[str, list[list[int]]] = field(default_factory=dict)
    multiple: int = 64
    align: int = WIDTH_ALIGN

    def width(self, block: MoEBlockSpec) -> int:
        """The stored width of ``block``'s experts under this plan (over the experts that keep channels): at
        least the widest kept count, rounded up to :func:`width_step` (and to ``multiple`` too when experts differ),
        at most the original width."""
        counts = {len(k) for k in self.kept_channels[block.path] if k}
        step = width_step(block.experts.intermediate_size, self.align)
        step = step if len(counts) == 1 else math.lcm(step, self.multiple)
        return min(block.experts.intermediate_size, -(-max(counts) // step) * step)

    def kept_experts(self, spec: MoEModelSpec) -> PrunePlan:
        """The expert-level plan implied: every expert keeping at least one channel."""
        return PrunePlan({b.path: [e for e, k in enumerate(self.kept_channels[b.path]) if k] for b in spec.blocks if b.path in self.kept_channels})

    def validate(self, spec: MoEModelSpec) -> None:
        """Raise :class:`BadOptionError` naming the first block the plan does not fit."""
        blocks = {b.path: b for b in spec.blocks}
        unknown = set(self.kept_channels) - set(blocks)
        if unknown:
            raise BadOptionError(f"channel plan names blocks the model does not have: {sorted(unknown)[:3]}")
        for path, kept in self.kept_channels.items():
            block = blocks[path]
            if len(kept) != block.num_experts:
                raise BadOptionError(f"{path}: channel plan lists {len(kept)} experts, the block has {block.num_experts}")
            width = block.experts.intermediate_size
            for e, ids in enumerate(kept):
                if len(set(ids)) != len(ids) or any(not 0 <= i < width for i in ids):
                    raise BadOptionError(f"{path}: expert {e}: kept channel ids must be distinct and in [0, {width})")
        self.kept_experts(spec).validate(spec)

    def to_dict(self) -> dict:
        """Kept channels as one hex bit mask per expert (compact: 4 bits per channel) and the widths."""
        return {
            "multiple": self.multiple,
            "align": self.align,
            "kept_channels": {p: [_mask_hex(ids, max(ids, default=0) + 1) for ids in k] for p, k in self.kept_channels.items()},
            "kept_widths": {p: [len(ids) for ids in k] for p, k in self.kept_channels.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> ChannelPlan:
        return cls({p: [_hex_ids(m) for m in masks] for p, masks in data["kept_channels"].items()}, int(data.get("multiple", 64)),
                   int(data.get("align", WIDTH_ALIGN)))
