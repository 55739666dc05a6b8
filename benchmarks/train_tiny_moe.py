"""Train a small MoE of another transformers family from scratch on the shared corpus, as the repository's
qwen3moe-bench / qwen3moe-micro were trained: trained models of families other than Qwen3-MoE for checking that a
pruning recipe chosen on the bench model holds elsewhere (issue 25). Random weights do not do for quality: routing
only specializes with training.

    # here (CPU): tokenize the train split once, so the device call carries 32 MB of token ids instead of the text
    python benchmarks/train_tiny_moe.py --tokenize ../shared/data/corpus/train.jsonl.gz --tokenizer ../shared/data/tokenizer.json \
        --save-tokens .device/data/train_tokens.pt
    # on the GPU machine: one model per family, saved with save_pretrained (bf16) and a report.json
    python benchmarks/train_tiny_moe.py --tokens .device/data/train_tokens.pt --family mixtral --size bench --no-tokenizer \
        --out $OUT/mixtral-bench

Families (``--family``), each at the bench model's scale (``--size bench``: hidden 256, 8 layers, 4 heads) or the
micro model's (``--size micro``: hidden 64, 2 layers), chosen for routing rules the bench model does not have:

- ``qwen2_moe``: 32 experts of width 128, top-4, no renormalization, plus a shared expert behind a sigmoid gate.
- ``mixtral``: 8 coarse experts of width 512, top-2, renormalized.
- ``olmoe``: 64 fine-grained experts of width 64, top-8, no renormalization.
- ``deepseek_v3``: the layout of DeepSeek-V3, Kimi-K2 and Moonlight: 32 experts of width 128, top-4 by sigmoid scores
  within the best 2 of 4 groups, renormalized and scaled by 2.5, a shared expert, multi-head latent attention; at bench
  scale the first layer is dense. Balanced without an auxiliary loss, by the routers' correction bias (``BIAS_STEP``).

Training: windows of 512 tokens, batch 64, AdamW (lr 2e-3, cosine after 100 warm-up steps, weight decay 0.1), the
family's switch-style load-balancing loss at 0.01 (in the reported loss; DeepSeek-V3's bias updates instead), bf16 autocast on a GPU, tied embeddings,
seeded. Quality is then measured by moe-fx on the valid split, as for the repository's models.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parents[1] / "examples" / "assets" / "qwen3moe-micro"
SIZES = {"bench": {"hidden_size": 256, "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2},
         "micro": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}}
FAMILIES = {
    "qwen2_moe": lambda scale: {"num_experts": 32, "num_experts_per_tok": 4, "moe_intermediate_size": 128 // scale,
                                "shared_expert_intermediate_size": 512 // scale, "intermediate_size": 512 // scale,
                                "norm_topk_prob": False, "decoder_sparse_step": 1},
    "mixtral": lambda scale: {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 512 // scale},
    "olmoe": lambda scale: {"num_experts": 64, "num_experts_per_tok": 8, "intermediate_size": 64 // scale, "norm_topk_prob": False},
    "deepseek_v3": lambda scale: {"n_routed_experts": 32, "num_experts_per_tok": 4, "n_shared_experts": 1, "moe_intermediate_size": 128 // scale,
                                  "intermediate_size": 512 // scale, "first_k_dense_replace": 1 if scale == 1 else 0, "n_group": 4,
                                  "topk_group": 2, "routed_scaling_factor": 2.5, "norm_topk_prob": True, "q_lora_rank": None,
                                  "kv_lora_rank": 128 // scale, "qk_nope_head_dim": 64 // scale, "qk_rope_head_dim": 32 // scale,
                                  "v_head_dim": 64 // scale, "num_key_value_heads": SIZES["bench"]["num_attention_heads"]},
}
BIAS_STEP = 1e-3
"""DeepSeek-V3's auxiliary-loss-free balancing: after each step every router's ``e_score_correction_bias`` moves by this
much towards its experts' mean load (up for underloaded experts, down for overloaded ones), as the paper trains it."""


def tokenize(corpus: Path, tokenizer_file: Path, out: Path) -> None:
    """Every train document's token ids, one end-of-text after each, as one uint16 tensor (vocab 8,192)."""
    from transformers import PreTrainedTokenizerFast

    from moe_fx.calibrate.data import read_documents

    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file))
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    ids: list[int] = []
    for doc in read_documents(corpus):
        ids.extend(tok(doc.text)["input_ids"])
        ids.append(eos)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torch.tensor(ids, dtype=torch.int32).to(torch.uint16), out)
    print(f"{len(ids):,} tokens -> {out}")


def build(family: str, size: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    scale = 1 if size == "bench" else 4
    config = AutoConfig.for_model(family, vocab_size=8192, max_position_embeddings=2048, tie_word_embeddings=True,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=1, output_router_logits=True,
                                  router_aux_loss_coef=0.01, **{**SIZES[size], **FAMILIES[family](scale)})  # a family may override a size
    return AutoModelForCausalLM.from_config(config)


def _router_loads(model) -> dict:
    """Routers with an ``e_score_correction_bias`` (DeepSeek-V3) -> their experts' token counts since the last
    :func:`_balance`, recorded by a forward hook on the router's chosen ids."""
    loads = {}
    for module in model.modules():
        if hasattr(module, "e_score_correction_bias"):
            loads[module] = torch.zeros_like(module.e_score_correction_bias)

            def record(mod, args, output):
                loads[mod] += torch.bincount(output[-1].flatten(), minlength=loads[mod].numel()).to(loads[mod].dtype)

            module.register_forward_hook(record)
    return loads


@torch.no_grad()
def _balance(loads: dict) -> None:
    """DeepSeek-V3's bias update: each router's bias rises by ``BIAS_STEP`` for experts below their mean load and falls
    for those above; the counts then restart."""
    for router, load in loads.items():
        router.e_score_correction_bias += BIAS_STEP * torch.sign(load.mean() - load)
        load.zero_()


def train(args) -> None:
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids = torch.load(args.tokens).to(torch.int32).long()
    model = build(args.family, args.size).to(device)
    loads = _router_loads(model)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95), fused=device == "cuda")
    lr_at = lambda s: args.lr * min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
    gen = torch.Generator().manual_seed(args.seed)
    t0, losses = time.perf_counter(), []
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, len(ids) - args.seq - 1, (args.batch,), generator=gen)
        batch = torch.stack([ids[s : s + args.seq] for s in starts]).to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        losses.append(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _balance(loads)
        if step % 200 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    seconds = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    # shards of at most 16 MB: one device call brings back at most 8 files of at most 16 MiB (a bench-size model: 4
    # shards, the index, the configs and the report; --no-tokenizer, and the tokenizer copied here afterwards)
    model.to(torch.bfloat16).save_pretrained(args.out, max_shard_size="16MB")
    if args.tokenizer_files:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(ASSETS / name, args.out / name)
    report = {"name": args.out.name, "family": args.family, "size": args.size, "params": params, "steps": args.steps,
              "seq": args.seq, "batch": args.batch, "lr": args.lr, "train_tokens": args.steps * args.seq * args.batch,
              "train_seconds": round(seconds, 1), "train_loss_last_100_steps": round(float(torch.stack(losses[-100:]).mean()), 4),
              "device": device,
              "torch": torch.__version__}
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenize", type=Path, help="a .jsonl(.gz) corpus to tokenize (with --tokenizer, --save-tokens)")
    ap.add_argument("--tokenizer", type=Path)
    ap.add_argument("--save-tokens", type=Path)
    ap.add_argument("--tokens", type=Path, help="token ids saved by --tokenize")
    ap.add_argument("--family", choices=sorted(FAMILIES))
    ap.add_argument("--size", choices=sorted(SIZES), default="bench")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--no-tokenizer", dest="tokenizer_files", action="store_false",
                    help="do not copy the tokenizer (the shared one, examples/assets/qwen3moe-micro's) into --out")
    args = ap.parse_args()
    if args.tokenize:
        tokenize(args.tokenize, args.tokenizer, args.save_tokens)
    else:
        if not (args.tokens and args.family and args.out):
            ap.error("training needs --tokens, --family and --out")
        train(args)


if __name__ == "__main__":
    main()
