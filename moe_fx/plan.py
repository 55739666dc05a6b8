"""PrunePlan: the one object that says what a rewrite keeps.

Everything that changes a model goes through a plan, so the same plan can be applied in memory, streamed
layer by layer, recorded in ``moe_fx.json`` and re-applied to another copy of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import BadOptionError
from .spec import MoEBlockSpec, MoEModelSpec


@dataclass
class PrunePlan:
    """Per block (module path), the original ids of the experts to keep, in their new order."""

    kept_experts: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def keep_all(cls, spec: MoEModelSpec) -> "PrunePlan":
        return cls({b.path: list(range(b.num_experts)) for b in spec.blocks})

    def to_dict(self) -> dict:
        return {"kept_experts": {k: list(map(int, v)) for k, v in self.kept_experts.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "PrunePlan":
        return cls({k: [int(i) for i in v] for k, v in data["kept_experts"].items()})

    def then(self, later: "PrunePlan") -> "PrunePlan":
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
