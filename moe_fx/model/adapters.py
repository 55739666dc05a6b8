"""Family adapters: the one place where transformers families differ.

An adapter is a small declarative record keyed by ``model_type``: which child modules are the router,
experts and shared experts, how routing scores are computed, and which config keys hold the counts.
Discovery (:mod:`moe_fx.model.trace`) reads the adapter; no pass ever branches on a family. A family with no
adapter gets :data:`GENERIC`, whose routing rule is read from the torch.export graph of the block
(:mod:`moe_fx.model.fx_check`).

Adding a family = one :func:`register_adapter` call in :mod:`moe_fx.model.families` (imported with this package, so
the built-in adapters are registered before any lookup) plus a tiny-config test.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from moe_fx.model.spec import CallStyle, ScoreFn

COUNT_ATTRS: tuple[str, ...] = (
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "moe_num_experts",
    "num_routed_experts",
    "n_experts",
)
"""Attribute / config-key names that hold a routed-expert count across families."""

WIDTH_ATTRS: tuple[str, ...] = ("intermediate_dim", "intermediate_size", "expert_dim", "moe_intermediate_size", "ffn_dim")
"""Experts-module attribute names that hold the intermediate (channel) width across families."""

WIDTH_KEYS: tuple[str, ...] = ("moe_intermediate_size", "expert_intermediate_size", "intermediate_size")
"""Config keys that may hold the routed experts' width, most specific first."""

TOPK_KEYS: tuple[str, ...] = ("num_experts_per_tok", "moe_top_k", "top_k", "moe_k", "num_experts_per_token")


@dataclass(frozen=True)
class FamilyAdapter:
    """How one family lays out its MoE blocks. Fields left ``None`` are inferred by discovery."""

    name: str
    experts_attrs: tuple[str, ...] = ("experts",)
    router_attrs: tuple[str, ...] = ("gate", "router")
    shared_attrs: tuple[str, ...] = ("shared_expert", "shared_experts", "shared_mlp")
    shared_gate_attrs: tuple[str, ...] = ("shared_expert_gate",)
    score_fn: ScoreFn | None = None
    """Routing score function; None: read from the block's torch.export graph."""
    norm_topk_prob: bool | None = None
    """None: read ``norm_topk_prob`` from the router, block or config (False if absent)."""
    call_style: CallStyle = "routed"
    block_tensors: tuple[str, ...] = ("expert_bias",)
    """Names of ``[E]`` tensors on the block module itself that must be sliced with the experts."""
    selection_bias_names: tuple[str, ...] = ("e_score_correction_bias", "expert_bias")
    scaling_attrs: tuple[str, ...] = ("routed_scaling_factor", "route_scale", "router_scaling_factor")
    legacy_count_keys: tuple[str, ...] = ()
    """Config keys that older transformers (4.57) read for the expert count; always written on save."""
    layer_carry: tuple[str, ...] = ()
    """Keyword arguments a decoder layer receives from the previous layer's output (its outputs after the hidden
    states, in order): GLM-5's and HY-V4's layers return ``(hidden, topk_indices)`` and take ``prev_topk_indices``."""
    unsupported: str | None = None
    """Reason the family cannot be rewritten (discovery raises with it)."""
    notes: str = ""

    def with_(self, **changes) -> FamilyAdapter:
        return replace(self, **changes)


GENERIC = FamilyAdapter(name="generic")

_REGISTRY: dict[str, FamilyAdapter] = {}


def register_adapter(model_types: str | tuple[str, ...], adapter: FamilyAdapter, *, overwrite: bool = False) -> None:
    """Register ``adapter`` for one or more ``model_type`` values.

    Registering a type twice raises unless ``overwrite=True``: a silently skipped registration is how
    families end up described by the wrong record.
    """
    for mt in (model_types,) if isinstance(model_types, str) else model_types:
        if mt != mt.lower() or not mt:
            raise ValueError(f"model_type must be a lower-case non-empty string, got {mt!r}")
        if mt in _REGISTRY and not overwrite:
            raise ValueError(f"an adapter for model_type {mt!r} is already registered; pass overwrite=True")
        _REGISTRY[mt] = adapter


def get_adapter(model_type: str) -> FamilyAdapter:
    """The adapter for ``model_type``, or :data:`GENERIC` when none is registered.

    A text sub-model type (``llama4_text``, ``qwen3_5_moe_text``) falls back to its family's adapter, so a
    text-only checkpoint of a multimodal family is described like the full model.
    """
    return _REGISTRY.get(model_type) or _REGISTRY.get(model_type.removesuffix("_text"), GENERIC)
