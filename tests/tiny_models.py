"""Tiny random models of every MoE family in the installed transformers, for fast family tests.

Configs are built through the config class's own constructor (never patched afterwards) so derived
fields (``layer_types``, head dims, per-layer configs) stay consistent with the shrunk sizes.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel
import transformers

SMALL: dict[str, object] = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=64,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    expert_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=16,
    max_position_embeddings=256,
    num_experts=8,
    num_local_experts=8,
    n_routed_experts=8,
    moe_num_experts=8,
    num_experts_per_tok=2,
    moe_k=2,
    top_k=2,
    first_k_dense_replace=0,
    n_group=1,
    topk_group=1,
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
"""Sizes applied to every (sub-)config field of the same name."""

OVERRIDES: dict[str, dict[str, object]] = {
    "dbrx": {
        "d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 256,
        "attn_config": {"kv_n_heads": 4, "rope_theta": 10000.0},
        "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 2},
    },
    "dots1": {"n_shared_experts": 1},
    "lfm2_moe": {"num_dense_layers": 0, "layer_types": ["conv", "full_attention"]},
}
"""Per-family constructor kwargs on top of :data:`SMALL`; a dict value is merged into that sub-config."""

AUTO_CLASSES: tuple[str, ...] = (
    "AutoModelForCausalLM",
    "AutoModelForImageTextToText",
    "AutoModelForMultimodalLM",
    "AutoModelForTokenClassification",
)
"""Model classes tried in order: the first whose mapping knows the config builds the tiny model."""

TOP_K: dict[str, int] = {"zaya": 1}
"""Families whose tiny model routes to other than ``SMALL["num_experts_per_tok"]`` experts."""

TINY_FAMILIES: list[str] = """
afmoe aria axk1 axk2 bailing_hybrid cohere2_moe deepseek_v2 deepseek_v3 deepseek_v32 dots1 ernie4_5_moe
exaone_moe flex_olmo glm4_moe glm4_moe_lite glm_moe_dsa gpt_oss granitemoe granitemoe_swa granitemoehybrid
granitemoeshared hunyuan_v1_moe hy_v3 hy_v4 jamba kimi_linear kolibri1 laguna lfm2_moe llama4 mellum
mimo_v2_flash minimax minimax_m2 minimax_m3_vl mistral4 mixtral nemotron_h olmoe qwen2_moe qwen3_moe
qwen3_5_moe qwen3_next qwen3_vl_moe qwen4_exp solar_open unlimited_ocr
""".split()
"""Families whose tiny model moe-fx discovers, checks, prunes and reloads (``tests/test_families.py``)."""

UNSUPPORTED_FAMILIES: list[str] = []
"""Families with routed experts that discovery must refuse with :class:`UnsupportedFamilyError`."""


def _fields(cls: type[PreTrainedConfig]) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def _kwargs(cls: type[PreTrainedConfig], overrides: dict[str, object]) -> dict[str, object]:
    """Constructor kwargs for ``cls``: the small sizes it has fields (or aliases) for, sub-configs shrunk too."""
    names = _fields(cls) | set(getattr(cls, "attribute_map", {}) or {})
    kw = {k: v for k, v in SMALL.items() if k in names}
    for key, sub_cls in (cls.sub_configs or {}).items():
        if isinstance(sub_cls, type) and issubclass(sub_cls, PreTrainedConfig):
            kw[key] = _kwargs(sub_cls, overrides.get(key, {}))
    return {**kw, **{k: v for k, v in overrides.items() if not isinstance(v, dict) or k not in kw}}


def tiny_config(model_type: str) -> PreTrainedConfig:
    cls = type(AutoConfig.for_model(model_type))
    return cls(**_kwargs(cls, OVERRIDES.get(model_type, {})))


def tiny_model(model_type: str) -> PreTrainedModel:
    """A tiny random model of ``model_type`` (deterministic: seeded), in eval mode."""
    config = tiny_config(model_type)
    torch.manual_seed(0)
    return auto_class(config).from_config(config).eval()


def auto_class(config: PreTrainedConfig) -> type:
    """The first auto class of :data:`AUTO_CLASSES` that can build ``config`` (also used to reload it)."""
    for name in AUTO_CLASSES:
        auto = getattr(transformers, name)
        if type(config) in auto._model_mapping:
            return auto
    raise ValueError(f"no auto class of {AUTO_CLASSES} builds {type(config).__name__}")
