"""Built-in family adapters (see :mod:`moe_fx.model.adapters`). Each entry is verified against the block's
torch.export graph by ``tests/test_families.py``; ``docs/families.md`` lists them all.

``norm_topk_prob`` is declared only where the router ignores the config flag (always or never
renormalises); families whose router reads ``config.norm_topk_prob`` leave it ``None`` so discovery
follows the checkpoint's config.
"""

from __future__ import annotations

from moe_fx.model.adapters import FamilyAdapter, register_adapter


def _unsupported(model_types: str | tuple[str, ...], reason: str) -> None:
    """Register a family that discovery must refuse, with the reason it prints."""
    name = model_types if isinstance(model_types, str) else model_types[0]
    register_adapter(model_types, FamilyAdapter(name, unsupported=reason))


# softmax over all experts, then top-k; renormalisation follows config.norm_topk_prob
register_adapter(
    ("qwen2_moe", "qwen3_moe"),
    FamilyAdapter("qwen_moe", score_fn="softmax", legacy_count_keys=("num_experts",)),
)
register_adapter(
    ("flex_olmo", "mellum", "mistral4", "olmoe", "qwen3_next", "qwen3_omni_moe", "qwen4_exp"),
    FamilyAdapter("softmax_topk", score_fn="softmax"),
)
# softmax, then top-k, always renormalised (the router has no flag)
register_adapter(
    "mixtral",
    FamilyAdapter("mixtral", score_fn="softmax", norm_topk_prob=True, legacy_count_keys=("num_local_experts",)),
)
register_adapter(
    (
        "ernie4_5_moe", "ernie4_5_vl_moe", "hunyuan_v1_moe", "minimax", "qwen3_5_moe", "qwen3_vl_moe",
    ),
    FamilyAdapter("softmax_topk_renorm", score_fn="softmax", norm_topk_prob=True),
)
register_adapter(  # the same routing; each decoder layer hands its sparse-attention indices to the next
    "mistral_large4",
    FamilyAdapter("softmax_topk_renorm_shared_indices", score_fn="softmax", norm_topk_prob=True, layer_carry=("prev_topk_indices",)),
)
# softmax, then top-k, never renormalised (DeepSeek-V2's router ignores its norm_topk_prob config key)
register_adapter(
    ("deepseek_ocr2", "deepseek_v2", "jamba", "unlimited_ocr"),
    FamilyAdapter("softmax_topk_plain", score_fn="softmax", norm_topk_prob=False),
)
# top-k on logits, softmax over the k kept logits (normalised by construction)
register_adapter(
    "gpt_oss",
    FamilyAdapter("gpt_oss", score_fn="softmax_after_topk", legacy_count_keys=("num_local_experts",)),
)
register_adapter(
    (
        "aria", "cohere2_moe", "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared",
        "openai_privacy_filter",
    ),
    FamilyAdapter("topk_softmax", score_fn="softmax_after_topk", norm_topk_prob=False),
)
# sigmoid scores (most with a selection bias), renormalisation follows config.norm_topk_prob
register_adapter(
    "deepseek_v3",
    FamilyAdapter("deepseek_v3", score_fn="sigmoid", legacy_count_keys=("n_routed_experts",)),
)
register_adapter(
    (
        "axk1", "axk2", "bailing_hybrid", "beam", "deepseek_v32", "dots1", "dots3_note", "exaone_moe", "flint",
        "glm4_moe", "glm4_moe_lite", "glm4v_moe", "kimi_linear", "lfm2_moe", "mimo_v2_flash", "nemotron_h", "solar_open",
    ),
    FamilyAdapter("sigmoid_topk", score_fn="sigmoid"),
)
# the same routing; each decoder layer hands its sparse-attention indices to the next
register_adapter(
    ("glm5_next", "glm_moe_dsa", "hy_v4"),
    FamilyAdapter("sigmoid_topk_shared_indices", score_fn="sigmoid", layer_carry=("prev_topk_indices",)),
)
# sigmoid scores, always renormalised
register_adapter(
    ("afmoe", "hy_v3", "inkling2", "laguna", "minimax_m2", "minimax_m3_vl", "muse_spark", "step3p7"),
    FamilyAdapter("sigmoid_topk_renorm", score_fn="sigmoid", norm_topk_prob=True),
)
# top-k on logits, sigmoid of the kept logits
register_adapter("kolibri1", FamilyAdapter("kolibri1", score_fn="sigmoid_after_topk"))
register_adapter(
    "llama4",
    FamilyAdapter("llama4", score_fn="sigmoid_after_topk", norm_topk_prob=False, call_style="dense_prescaled"),
)

_unsupported("dbrx", "experts are stored as 2D [E*ffn, H] stacks (w1/v1/w2), not fused 3D tensors")
_unsupported("phimoe", "sparsemixer routing (masked softmax with a jitter threshold) is not a top-k rule")
_unsupported("zaya", "the MLP router scores E + 1 classes (a compute-free skip expert) and carries state across layers")
_unsupported("longcat_flash", "the router scores E + zero_expert_num classes (identity 'zero experts')")
_unsupported("deepseek_v4", "hash-routed layers pick experts through a token-id table (tid2eid) that pruning would have to remap")
_unsupported(
    ("gemma4", "diffusion_gemma"),
    "router and experts are attributes of the decoder layer itself, run beside a dense MLP; the MoE part cannot "
    "be exported or called on hidden states alone",
)
_unsupported(
    ("inkling", "inkling_mm_model"),
    "the router weight scores routed and shared experts jointly ([E + n_shared, H], one normalisation over both), "
    "so its rows do not match the expert count",
)
