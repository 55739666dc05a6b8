"""Built-in family adapters (see :mod:`moe_fx.adapters`). Each entry is verified against the block's
torch.export graph by ``tests/test_families.py``; ``docs/families.md`` lists them all.

``norm_topk_prob`` is declared only where the router ignores the config flag (always or never
renormalises); families whose router reads ``config.norm_topk_prob`` leave it ``None`` so discovery
follows the checkpoint's config.
"""

from __future__ import annotations

from .adapters import FamilyAdapter, register_adapter

# softmax over all experts, then top-k; renormalisation follows config.norm_topk_prob
register_adapter(("qwen2_moe", "qwen3_moe"), FamilyAdapter("qwen_moe", score_fn="softmax", legacy_count_keys=("num_experts",)))
register_adapter(
    ("qwen3_next", "qwen4_exp", "olmoe", "flex_olmo", "mellum", "mistral4", "mistral_large4"),
    FamilyAdapter("softmax_topk", score_fn="softmax"),
)
# softmax, then top-k, always renormalised (no config flag)
register_adapter("mixtral", FamilyAdapter("mixtral", score_fn="softmax", norm_topk_prob=True, legacy_count_keys=("num_local_experts",)))
register_adapter(
    ("minimax", "qwen3_5_moe", "qwen3_vl_moe", "qwen3_omni_moe", "hunyuan_v1_moe", "ernie4_5_moe", "ernie4_5_vl_moe"),
    FamilyAdapter("softmax_topk_renorm", score_fn="softmax", norm_topk_prob=True),
)
# softmax, then top-k, never renormalised (DeepSeek-V2 has a norm_topk_prob config key that its router ignores)
register_adapter(
    ("deepseek_v2", "jamba", "unlimited_ocr", "deepseek_ocr2"),
    FamilyAdapter("softmax_topk_plain", score_fn="softmax", norm_topk_prob=False),
)
# top-k on logits, softmax over the k kept logits (normalised by construction)
register_adapter("gpt_oss", FamilyAdapter("gpt_oss", score_fn="softmax_after_topk", legacy_count_keys=("num_local_experts",)))
register_adapter(
    ("granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared", "aria", "cohere2_moe", "openai_privacy_filter"),
    FamilyAdapter("topk_softmax", score_fn="softmax_after_topk", norm_topk_prob=False),
)
# sigmoid scores, selection bias (e_score_correction_bias), renormalisation follows config.norm_topk_prob
register_adapter(("deepseek_v3",), FamilyAdapter("deepseek_v3", score_fn="sigmoid", legacy_count_keys=("n_routed_experts",)))
register_adapter(
    (
        "deepseek_v32", "glm4_moe", "glm4_moe_lite", "glm4v_moe", "glm_moe_dsa", "dots1", "axk1", "axk2",
        "bailing_hybrid", "exaone_moe", "hy_v4", "kimi_linear", "lfm2_moe", "mimo_v2_flash", "nemotron_h", "solar_open",
    ),
    FamilyAdapter("sigmoid_topk", score_fn="sigmoid"),
)
# sigmoid scores, always renormalised
register_adapter(
    ("afmoe", "hy_v3", "inkling2", "laguna", "minimax_m2", "minimax_m3_vl", "step3p7"),
    FamilyAdapter("sigmoid_topk_renorm", score_fn="sigmoid", norm_topk_prob=True),
)
# top-k on logits, sigmoid of the kept logits
register_adapter("kolibri1", FamilyAdapter("kolibri1", score_fn="sigmoid_after_topk"))
register_adapter(
    "llama4",
    FamilyAdapter("llama4", score_fn="sigmoid_after_topk", norm_topk_prob=False, call_style="dense_prescaled"),
)

register_adapter(
    "dbrx",
    FamilyAdapter("dbrx", unsupported="experts are stored as 2D [E*ffn, H] stacks (w1/v1/w2), not fused 3D tensors"),
)
register_adapter(
    "phimoe",
    FamilyAdapter("phimoe", unsupported="sparsemixer routing (masked softmax with jitter threshold) is not a top-k rule"),
)
register_adapter(
    "zaya",
    FamilyAdapter("zaya", unsupported="the MLP router scores E + 1 classes (a compute-free skip expert) and carries state across layers"),
)
register_adapter(
    "longcat_flash",
    FamilyAdapter("longcat_flash", unsupported="the router scores E + zero_expert_num classes (identity 'zero experts')"),
)
register_adapter(
    "deepseek_v4",
    FamilyAdapter(
        "deepseek_v4",
        unsupported="hash-routed layers pick experts through a token-id table (tid2eid) that pruning would have to remap",
    ),
)
