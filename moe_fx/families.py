"""Built-in family adapters (see :mod:`moe_fx.adapters`). Each entry is verified against the block's
torch.export graph by ``tests/test_families.py``."""

from __future__ import annotations

from .adapters import FamilyAdapter, register_adapter

register_adapter(("qwen2_moe", "qwen3_moe"), FamilyAdapter("qwen_moe", score_fn="softmax", legacy_count_keys=("num_experts",)))
register_adapter("mixtral", FamilyAdapter("mixtral", score_fn="softmax", norm_topk_prob=True, legacy_count_keys=("num_local_experts",)))
register_adapter(("deepseek_v3",), FamilyAdapter("deepseek_v3", score_fn="sigmoid", legacy_count_keys=("n_routed_experts",)))
register_adapter("gpt_oss", FamilyAdapter("gpt_oss", score_fn="softmax_after_topk", legacy_count_keys=("num_local_experts",)))
