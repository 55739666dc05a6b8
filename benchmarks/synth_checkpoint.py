"""Write a random-weight checkpoint exactly as the hub stores a real one, for scale runs without downloads.

    python benchmarks/synth_checkpoint.py --preset qwen3-30b-a3b --layers 24 --out /data/q30b --device cuda
    python benchmarks/synth_checkpoint.py --preset gpt-oss-20b --tiny --out /tmp/gpt-oss-tiny

The tensor names, shapes, dtypes and sharding are the hub's: the model class is built from the preset's config on
the meta device and transformers' own save-time conversion (``revert_weight_conversion``) gives the on-disk names,
so Qwen3-MoE and DeepSeek-V2 get one tensor per expert (``experts.N.gate_proj.weight``) that ``from_pretrained``
fuses on load, and GPT-OSS gets its MXFP4 expert blocks and scales (``gate_up_proj_blocks`` / ``_scales``, uint8)
with the ``quantization_config`` the hub's checkpoint carries. Shards of about ``--shard-gb`` GB with
``model.safetensors.index.json``, the config, a generation config and a tokenizer (copied from ``--tokenizer``;
its ids must fit the preset's vocabulary).

Weights: normal with std 0.02 (transformers' initializer range), norms 1, biases small; router rows drawn so a
token's router logits have a standard deviation of about ``--router-std`` (1.5: top-k weights spread like a trained
router's, not uniform, and every expert reachable), plus a per-expert offset of std 0.3 so expert loads are uneven
as in real models. Each tensor is seeded from ``--seed`` and its name, so the weights do not depend on sharding or
order. ``--tiny`` keeps each preset's structure (MLA, dense first layer, shared experts, MXFP4 experts) at small
sizes for CPU tests. Memory: one shard at a time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import torch

PRESETS: dict[str, dict] = {
    "qwen3-30b-a3b": {
        "model_type": "qwen3_moe", "layers": 48,
        "full": dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936, norm_topk_prob=True,
                     max_position_embeddings=40960, rope_theta=1_000_000.0, tie_word_embeddings=False),
        "tiny": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=8192, norm_topk_prob=True, tie_word_embeddings=False),
    },
    "deepseek-v2-lite": {
        "model_type": "deepseek_v2", "layers": 27,
        "full": dict(hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=64, n_shared_experts=2,
                     num_experts_per_tok=6, first_k_dense_replace=1, num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512,
                     q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, vocab_size=102400, topk_method="greedy",
                     n_group=1, topk_group=1, routed_scaling_factor=1.0, max_position_embeddings=163840, tie_word_embeddings=False),
        "tiny": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=16, n_shared_experts=2,
                     num_experts_per_tok=4, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
                     q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, vocab_size=8192, topk_method="greedy",
                     n_group=1, topk_group=1, tie_word_embeddings=False),
    },
    "gpt-oss-20b": {
        "model_type": "gpt_oss", "layers": 24, "mxfp4": True,
        "full": dict(hidden_size=2880, intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4, num_attention_heads=64,
                     num_key_value_heads=8, head_dim=64, vocab_size=201088, sliding_window=128, max_position_embeddings=131072,
                     tie_word_embeddings=False),
        "tiny": dict(hidden_size=64, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, vocab_size=8192, sliding_window=16, tie_word_embeddings=False),
    },
    "llama4-scout": {  # the text model of Llama-4-Scout-17B-16E (the hub's checkpoint wraps it with a vision tower)
        "model_type": "llama4_text", "layers": 48,
        "full": dict(hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384, num_local_experts=16, num_experts_per_tok=1,
                     num_attention_heads=40, num_key_value_heads=8, head_dim=128, vocab_size=202048, max_position_embeddings=10485760,
                     tie_word_embeddings=False),
        "tiny": dict(hidden_size=64, intermediate_size=64, intermediate_size_mlp=128, num_local_experts=8, num_experts_per_tok=1,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=8192, tie_word_embeddings=False),
    },
}
"""Preset -> model type, default depth, and config sizes at full scale (the hub's config.json) and at ``--tiny`` scale."""

ARCHITECTURES = {"qwen3_moe": "Qwen3MoeForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM", "gpt_oss": "GptOssForCausalLM",
                 "llama4_text": "Llama4ForCausalLM"}
"""The ``architectures`` entry of each family's hub config."""

MXFP4_BLOCK = 32
"""Values per MXFP4 block: 16 bytes of two 4-bit E2M1 codes each, one shared power-of-two scale byte."""


def make_config(preset: str, layers: int | None, tiny: bool):
    """The preset's transformers config with ``layers`` decoder layers (GPT-OSS: the hub's MXFP4 quantization_config)."""
    from transformers import AutoConfig

    spec = PRESETS[preset]
    kwargs = dict(spec["tiny" if tiny else "full"], num_hidden_layers=layers or spec["layers"])
    if spec["model_type"] == "gpt_oss":
        kwargs["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(kwargs["num_hidden_layers"])]
    config = AutoConfig.for_model(spec["model_type"], **kwargs)
    config.dtype = torch.bfloat16
    config.architectures = [ARCHITECTURES[spec["model_type"]]]
    if spec.get("mxfp4"):
        config.quantization_config = {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    return config


def hub_tensors(config) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """On-disk name -> (shape, dtype) of every tensor, in the order the hub's files list them."""
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    plain = config.__class__.from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(plain)
    state = revert_weight_conversion(model, remove_tied_weights_from_state_dict(model.state_dict(), model))
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, t in state.items():
        if getattr(config, "quantization_config", None) and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            e, k, n = t.shape  # GPT-OSS stores [E, in, out]; MXFP4 blocks run along the input axis of [E, out, in]
            out[f"{name}_blocks"] = ((e, n, k // MXFP4_BLOCK, MXFP4_BLOCK // 2), torch.uint8)
            out[f"{name}_scales"] = ((e, n, k // MXFP4_BLOCK), torch.uint8)
        else:
            out[name] = (tuple(t.shape), torch.bfloat16)
    return out


def _generator(seed: int, name: str, device: str) -> torch.Generator:
    digest = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)
    return torch.Generator(device).manual_seed(digest)


def draw(name: str, shape: tuple[int, ...], dtype: torch.dtype, config, *, seed: int, router_std: float, device: str) -> torch.Tensor:
    """Random values for one on-disk tensor (see module doc), on the CPU."""
    g = _generator(seed, name, device)
    randn = lambda *s: torch.randn(*s, generator=g, device=device)
    leaf = name.rsplit(".", 1)[-1]
    if dtype == torch.uint8 and name.endswith("_scales"):
        # 2^(s - 127) with s = 121 +- 1: E2M1 codes (|x| <= 6, typically ~1) times 1/64 give weights of std ~0.02
        t = (121 + torch.randint(-1, 2, shape, generator=g, device=device)).to(torch.uint8)
    elif dtype == torch.uint8:
        t = torch.randint(0, 256, shape, generator=g, device=device, dtype=torch.int32).to(torch.uint8)
    elif "norm" in name or leaf == "weight" and len(shape) == 1:
        t = torch.ones(shape, device=device)
    elif name.endswith((".mlp.gate.weight", ".mlp.router.weight", ".feed_forward.router.weight")):
        e, h = shape  # logits of a unit-RMS hidden state: std router_std, plus an uneven popularity per expert
        rows = randn(e, h) * (router_std / math.sqrt(h))
        popularity = randn(e, 1) * 0.3
        t = rows + popularity * torch.nn.functional.normalize(randn(1, h), dim=-1)
    elif leaf in ("bias", "sinks") or name.endswith(("_bias", "bias")):
        t = randn(*shape) * 0.02
    else:
        t = randn(*shape) * 0.02
    return t.to(dtype).cpu()


def write_checkpoint(preset: str, out: Path, *, layers: int | None = None, tiny: bool = False, seed: int = 0, shard_gb: float = 4.5,
                     router_std: float = 1.5, device: str = "cpu", tokenizer: Path | None = None, quiet: bool = False) -> dict:
    """Write the checkpoint into ``out`` (which must not exist); return a summary (bytes, shards, seconds)."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    if out.exists():
        raise SystemExit(f"{out} exists: give a new directory")
    t0 = time.perf_counter()
    config = make_config(preset, layers, tiny)
    tensors = hub_tensors(config)
    limit = int(shard_gb * 1e9)
    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape, dtype) in tensors.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        chunk = {n: draw(n, *tensors[n], config, seed=seed, router_std=router_std, device=device) for n in names}
        save_file(chunk, tmp / file, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in chunk.values())
        weight_map.update(dict.fromkeys(names, file))
        if not quiet:
            print(f"  {file}: {len(names)} tensors, {sum(t.numel() * t.element_size() for t in chunk.values()) / 1e9:.2f} GB "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        del chunk
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    config.save_pretrained(tmp)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id).save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, tmp / name)
    tmp.rename(out)
    return {"preset": preset, "layers": config.num_hidden_layers, "tiny": tiny, "tensors": len(tensors), "shards": len(shards),
            "bytes": total, "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--layers", type=int, help="decoder layers (default: the model's own depth)")
    ap.add_argument("--tiny", action="store_true", help="small sizes with the preset's structure (CPU tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gb", type=float, default=4.5)
    ap.add_argument("--router-std", type=float, default=1.5)
    ap.add_argument("--device", default="cpu", help="where the random numbers are drawn (cuda is faster; its values differ from the CPU's)")
    ap.add_argument("--tokenizer", type=Path, default=Path(__file__).resolve().parents[1] / "examples" / "assets" / "qwen3moe-micro")
    args = ap.parse_args()
    summary = write_checkpoint(args.preset, args.out, layers=args.layers, tiny=args.tiny, seed=args.seed, shard_gb=args.shard_gb,
                               router_std=args.router_std, device=args.device, tokenizer=args.tokenizer)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
