"""The canonical description of a model's MoE blocks.

Every pass reads these records and nothing else about a family: where the router and experts live, how
tokens are routed, which tensors carry one slice per expert, and which config keys hold the counts. The
records are frozen and hold *names* (module paths, tensor names), never tensors, so a spec can be
serialised, compared, and applied to another copy of the same weights (e.g. layer by layer).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

ScoreFn = Literal["softmax", "sigmoid", "softmax_after_topk", "sigmoid_after_topk"]
"""How router logits become routing weights.

``softmax``/``sigmoid``: over all experts, then top-k (Qwen, Mixtral, DeepSeek-V3, ...).
``softmax_after_topk``: top-k on logits, softmax over the k kept logits (GPT-OSS).
``sigmoid_after_topk``: top-k on logits, sigmoid of the kept logits (Llama 4).
"""

CallStyle = Literal["routed", "dense_prescaled"]
"""How the block calls its experts module.

``routed``: ``experts(hidden[T,H], top_k_index[T,k], top_k_weights[T,k]) -> [T,H]`` (transformers 5 standard).
``dense_prescaled``: ``experts(hidden * score_e stacked over experts [E*T,H]) -> [E*T,H]`` (Llama 4).
"""


@dataclass(frozen=True)
class RouterSpec:
    """The router of one block and its routing rule."""

    path: str
    """Module path of the router (relative to the model root)."""
    weight: str
    """Full parameter name of the ``[E, H]`` router weight."""
    bias: str | None
    """Full name of the router's ``[E]`` logit bias, if any (GPT-OSS)."""
    selection_bias: str | None
    """Full name of an ``[E]`` bias added only for expert *selection* (DeepSeek-V3 ``e_score_correction_bias``)."""
    score_fn: ScoreFn
    top_k: int
    norm_topk_prob: bool
    n_group: int | None
    """Group-limited routing: experts form ``n_group`` equal groups of consecutive ids, and each token picks its
    top-k among the experts of its ``topk_group`` best groups (None or 1: no groups)."""
    topk_group: int | None
    routed_scaling_factor: float
    count_attrs: tuple[str, ...]
    """``module_path:attribute`` of every integer attribute holding the expert count (updated on rewrite)."""
    group_score: str = "top2_sum"
    """How a group is scored for group-limited routing: ``top2_sum`` (sum of its two best selection scores;
    DeepSeek-V3 and the routers that copy it) or ``max`` (its best score; DeepSeek-V2's group_limited_greedy)."""


@dataclass(frozen=True)
class ExpertsSpec:
    """The routed experts of one block, stored as fused 3D tensors ``[E, ...]``."""

    path: str
    num_experts: int
    hidden_size: int
    intermediate_size: int
    tensors: tuple[str, ...]
    """Full names of every parameter/buffer whose first dimension indexes experts."""
    gate_up: str | None
    """Full name of the fused gate/up projection (None for non-gated experts)."""
    up: str | None
    """Full name of the up projection of non-gated experts (NemotronH, ...)."""
    down: str
    is_transposed: bool
    """``[E, in, out]`` storage (GPT-OSS) instead of ``[E, out, in]``."""
    is_concatenated: bool
    """Gate and up halves stored ``[gate; up]`` (True) or interleaved ``g0,u0,g1,u1`` (False, GPT-OSS)."""
    has_bias: bool
    activation: str
    call_style: CallStyle
    width_attrs: tuple[str, ...] = ()
    """``module_path:attribute`` of every integer attribute holding the experts' intermediate size."""


@dataclass(frozen=True)
class SharedExpertSpec:
    """An always-active expert beside the routed ones (left untouched by expert pruning)."""

    path: str
    gate_path: str | None
    """Module path of the shared-expert gate (Qwen2-MoE ``shared_expert_gate``), if any."""
    intermediate_size: int | None


@dataclass(frozen=True)
class MoEBlockSpec:
    """One MoE block: its router, routed experts, shared experts and per-expert tensors of the block itself."""

    path: str
    layer_index: int | None
    router: RouterSpec
    experts: ExpertsSpec
    shared: tuple[SharedExpertSpec, ...]
    block_tensors: tuple[str, ...]
    """Full names of ``[E]`` tensors owned by the block itself (AFMoE ``expert_bias``)."""
    count_attrs: tuple[str, ...]
    """``module_path:attribute`` of integer expert-count attributes on the block module."""

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k

    @property
    def per_expert_tensors(self) -> tuple[str, ...]:
        """Every tensor that must be sliced together when experts are dropped, in a stable order."""
        names = [self.router.weight]
        names += [n for n in (self.router.bias, self.router.selection_bias) if n]
        return tuple(dict.fromkeys(names + list(self.block_tensors) + list(self.experts.tensors)))


@dataclass(frozen=True)
class MoEModelSpec:
    """All MoE blocks of a model plus the config handles a rewrite must update."""

    model_type: str
    family: str
    """The adapter that described the model (a registered ``model_type`` or ``generic``)."""
    num_layers: int
    blocks: tuple[MoEBlockSpec, ...]
    dense_layers: tuple[int, ...]
    """Decoder layers without routed experts (first_k_dense_replace, mlp_only_layers, decoder_sparse_step)."""
    config_count_keys: tuple[str, ...] = field(default=())
    """``config_path:key`` of every config entry holding the expert count (all aliases, also text_config)."""
    config_topk_keys: tuple[str, ...] = field(default=())
    config_width_keys: tuple[str, ...] = field(default=())
    """``config_path:key`` of the config entry holding the routed experts' intermediate size (the most
    specific name: ``moe_intermediate_size`` before ``intermediate_size``, which may size dense layers too)."""
    layer_carry: tuple[str, ...] = field(default=())
    """Keyword arguments each decoder layer takes from the previous layer's extra outputs (the adapter's
    ``layer_carry``): a layer-by-layer run must hand them on."""

    def to_dict(self) -> dict:
        return asdict(self)

    def summary_rows(self) -> list[dict]:
        """One flat row per block, for tables."""
        rows = []
        for b in self.blocks:
            r = b.router
            rows.append(
                {
                    "block": b.path,
                    "layer": b.layer_index,
                    "experts": b.num_experts,
                    "top_k": r.top_k,
                    "score": r.score_fn,
                    "norm_topk": r.norm_topk_prob,
                    "groups": f"{r.n_group}/{r.topk_group}" if r.n_group and r.n_group > 1 else "-",
                    "scale": r.routed_scaling_factor,
                    "width": b.experts.intermediate_size,
                    "layout": ("transposed" if b.experts.is_transposed else "standard")
                    + ("" if b.experts.is_concatenated else "+interleaved")
                    + ("+bias" if b.experts.has_bias else ""),
                    "shared": len(b.shared),
                }
            )
        return rows
