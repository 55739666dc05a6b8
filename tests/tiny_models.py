"""Tiny random models of every MoE family in the installed transformers, for fast family tests.

Configs are built through the config class's own constructor (never patched afterwards) so derived
fields (``layer_types``, head dims, per-layer configs) stay consistent with the shrunk sizes.
"""

from __future__ import annotations

import dataclasses

import torch
import transformers
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel

SMALL: dict[str, object] = dict(
    vocab_size=128,
    unpadded_vocab_size=128,  # inkling2 pads its lm_head from this to vocab_size on load (transformers 5.24+)
    hidden_size=64,
    intermediate_size=64,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    expert_intermediate_size=32,
    share_expert_dim=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=16,
    max_position_embeddings=256,
    depth=1,
    num_heads=4,
    out_hidden_size=64,
    projector_hidden_size=64,
    projection_intermediate_size=64,
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
    linear_num_value_heads=4,
    linear_num_key_heads=2,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_num_heads=4,
    linear_head_dim=16,
    norm_topk_prob=True,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
"""Sizes applied to every (sub-)config field of the same name."""

_MROPE = {"rope_type": "default", "rope_theta": 10000.0}

OVERRIDES: dict[str, dict[str, object]] = {
    # MoE layers are off by default in a 2-layer model (dense prefix or dense-only default)
    "beam": {"mlp_layer_types": ["sparse", "sparse"]},
    "deepseek_ocr2": {"text_config": {"mlp_layer_types": ["sparse", "sparse"]}},
    "flint": {"mlp_only_layers": []},
    "lfm2_moe": {"num_dense_layers": 0, "layer_types": ["conv", "full_attention"]},
    "gemma4": {"text_config": {"enable_moe_block": True, "top_k_experts": 2}},
    "diffusion_gemma": {"text_config": {"enable_moe_block": True, "top_k_experts": 2}},
    # group-limited routing exercised (kept experts must be balanced across groups)
    "deepseek_v3": {"n_group": 2, "topk_group": 1},
    # one config-driven family without renormalisation
    "qwen3_moe": {"norm_topk_prob": False},
    # fields whose defaults are None or sized for the full model
    "dbrx": {
        "d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 256,
        "attn_config": {"kv_n_heads": 4, "rope_theta": 10000.0, "clip_qkv": 8.0},
        "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 2},
    },
    "dots1": {"n_shared_experts": 1},
    "longcat_flash": {
        "num_layers": 1, "ffn_hidden_size": 64, "expert_ffn_hidden_size": 32, "moe_topk": 2, "zero_expert_num": 2,
    },
    "mimo_v2_flash": {"num_key_value_heads": 2},  # sliding layers double the kv heads
    "zaya": {"num_experts_per_tok": 1},  # its config accepts top-1 only
    # validators tying sub-configs together, rope sections summing to the rotary dim
    "dots3_note": {
        "vision_config": {"mlp_layer_types": ["dense", "dense"], "adapter_in_dim": 64, "adapter_out_dim": 64},
        "audio_config": {"adapter_out_dim": 64, "adapter_input_size": 64},
    },
    "ernie4_5_vl_moe": {
        "text_config": {"moe_intermediate_size": [32, 32], "rope_parameters": {**_MROPE, "mrope_section": [3, 3, 2]}}
    },
    "glm4v_moe": {
        "text_config": {"rope_parameters": {**_MROPE, "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1]}}
    },
    "glm5_next": {
        "text_config": {"qk_rope_head_dim": 0, "qk_nope_head_dim": 16, "mlp_layer_types": ["sparse", "sparse"]}
    },
    "inkling2": {"vision_config": {"text_hidden_size": 64}},
    "muse_spark": {"audio_config": {"num_hidden_layers": 4, "hidden_sizes": [8, 8, 8, 8], "depths": [1, 1, 1, 1]}},
    "step3p7": {"text_config": {"sliding_window": 64, "mlp_layer_types": ["sparse", "sparse"]}},
}
"""Per-family constructor kwargs on top of :data:`SMALL`; a dict value is merged into that sub-config."""

AUTO_CLASSES: tuple[str, ...] = (
    "AutoModelForCausalLM",
    "AutoModelForImageTextToText",
    "AutoModelForMultimodalLM",
    "AutoModelForTokenClassification",
)
"""Model classes tried in order: the first whose mapping knows the config builds the tiny model."""

TINY_FAMILIES: list[str] = """
afmoe aria axk1 axk2 bailing_hybrid beam cohere2_moe deepseek_ocr2 deepseek_v2 deepseek_v3 deepseek_v32 dots1
dots3_note ernie4_5_moe ernie4_5_vl_moe exaone_moe flex_olmo flint glm4_moe glm4_moe_lite glm4v_moe glm5_next
glm_moe_dsa gpt_oss granitemoe granitemoe_swa granitemoehybrid granitemoeshared hunyuan_v1_moe hy_v3 hy_v4
inkling2 jamba kimi_linear kolibri1 laguna lfm2_moe llama4 mellum mimo_v2_flash minimax minimax_m2
minimax_m3_vl mistral4 mistral_large4 mixtral muse_spark nemotron_h olmoe openai_privacy_filter qwen2_moe
qwen3_5_moe qwen3_moe qwen3_next qwen3_omni_moe_thinker qwen3_vl_moe qwen4_exp solar_open step3p7
unlimited_ocr
""".split()
"""Families whose tiny model moe-fx discovers, checks, prunes and reloads (``tests/test_families.py``)."""

UNSUPPORTED_FAMILIES: list[str] = ["dbrx", "deepseek_v4", "diffusion_gemma", "gemma4", "longcat_flash", "phimoe", "zaya"]
"""Families with routed experts that discovery must refuse with :class:`UnsupportedFamilyError`."""


def _fields(cls: type[PreTrainedConfig]) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def _is_config_class(c: object) -> bool:
    return isinstance(c, type) and issubclass(c, PreTrainedConfig)


def _sub_config_classes(cls: type[PreTrainedConfig]) -> dict[str, type[PreTrainedConfig]]:
    """The required sub-configs of ``cls`` (text, vision, ...), resolving ``AutoConfig`` specs by model type."""
    specs = getattr(cls, "sub_configs_defaults", None)
    if not specs:
        return {k: c for k, c in (cls.sub_configs or {}).items() if _is_config_class(c)}
    out = {}
    for key, spec in specs.items():
        c = spec.config_class
        if not _is_config_class(c) and spec.model_type:
            c = spec.get_config_class(spec.model_type)
        if _is_config_class(c) and not spec.optional:
            out[key] = c
    return out


def _kwargs(cls: type[PreTrainedConfig], overrides: dict[str, object]) -> dict[str, object]:
    """Constructor kwargs for ``cls``: the small sizes it has fields (or aliases) for, sub-configs shrunk too."""
    names = _fields(cls) | set(getattr(cls, "attribute_map", {}) or {})
    kw = {k: v for k, v in SMALL.items() if k in names}
    for key, sub_cls in _sub_config_classes(cls).items():
        kw[key] = _kwargs(sub_cls, overrides.get(key, {}))
    return {**kw, **{k: v for k, v in overrides.items() if not isinstance(v, dict) or k not in kw}}


def tiny_config(model_type: str, **overrides: object) -> PreTrainedConfig:
    """The tiny config of ``model_type``: :data:`SMALL` sizes plus the family's :data:`OVERRIDES` (and ``overrides``)."""
    cls = type(AutoConfig.for_model(model_type))
    return cls(**_kwargs(cls, {**OVERRIDES.get(model_type, {}), **overrides}))


def tiny_model(model_type: str, **overrides: object) -> PreTrainedModel:
    """A tiny random model of ``model_type`` (deterministic: seeded), in eval mode; ``overrides`` as in :func:`tiny_config`."""
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(0)
    model = auto_class(config).from_config(config).eval()
    _perturb_constants(model)
    return model


@torch.no_grad()
def _perturb_constants(model: PreTrainedModel) -> None:
    """Add noise to constant tensors (zero-initialised routers and selection biases, unit norms).

    A zero router ties every expert, so top-k picks by index and expert order becomes observable; a zero
    selection bias hides a bias that pruning forgot to slice. Random values make both show in logits.
    """
    generator = torch.Generator().manual_seed(1)
    tensors = [p for p in model.parameters()] + [b for n, b in model.named_buffers() if n.endswith("bias")]
    for t in tensors:
        if t.is_floating_point() and t.numel() > 1 and bool((t == t.flatten()[0]).all()):
            t.add_(0.02 * torch.randn(t.shape, generator=generator).to(t.dtype))


@torch.no_grad()
def first_experts_call(model: PreTrainedModel, input_ids: torch.Tensor) -> tuple[torch.nn.Module, tuple]:
    """The first fused experts module of ``model`` and the inputs a forward on ``input_ids`` calls it with
    (``hidden_states, top_k_index, top_k_weights``): real routing, for checks of an experts call alone."""
    experts = next(m for m in model.modules() if hasattr(m, "has_gate") and hasattr(m, "is_transposed"))
    calls = []
    handle = experts.register_forward_pre_hook(lambda mod, args: calls.append(args))
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        handle.remove()
    return experts, calls[0]


def auto_class(config: PreTrainedConfig) -> type:
    """The first auto class of :data:`AUTO_CLASSES` that can build ``config`` (also used to reload it)."""
    for name in AUTO_CLASSES:
        auto = getattr(transformers, name)
        if type(config) in auto._model_mapping:
            return auto
    raise ValueError(f"no auto class of {AUTO_CLASSES} builds {type(config).__name__}")


def tiny_checkpoint(model_type: str, path, *, tokenizer_from, vocab_size: int = 8192, **overrides: object):
    """A tiny random ``model_type`` checkpoint on disk as the hub lays it out (config, safetensors, tokenizer),
    with the vocabulary of the tokenizer copied from ``tokenizer_from`` (a checkpoint directory), so the command
    line can calibrate and evaluate it on real text; ``overrides`` as in :func:`tiny_config`. Deterministic
    (seeded); returns ``path``."""
    import shutil
    from pathlib import Path

    config = tiny_config(model_type, **overrides)
    config.vocab_size = vocab_size
    text = config.get_text_config()
    text.vocab_size = vocab_size  # multimodal configs embed text with their text config's vocabulary
    if getattr(text, "unpadded_vocab_size", None) is not None:  # Inkling2 cuts its logits to this many
        text.unpadded_vocab_size = vocab_size
    torch.manual_seed(0)
    model = auto_class(config).from_config(config).eval()
    _perturb_constants(model)
    path = Path(path)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tokenizer_from) / name, path / name)
    return path
