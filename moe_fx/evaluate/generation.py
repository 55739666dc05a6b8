"""Generation agreement: how far a pruned model's greedy continuations follow the unpruned model's.

Why: pruning hurts generation more than next-token NLL or multiple choice shows (an early wrong token changes
everything after it), and at small sizes zero-shot tasks do not discriminate. So: held-out prompts (windows of
the evaluation text, balanced across domains), ``new_tokens`` greedy tokens from the reference (unpruned) model
and from the candidate, and:

- ``exact_match``: the share of prompts whose ``new_tokens`` tokens are all the reference's;
- ``prefix_tokens``: the mean number of leading tokens that agree (``new_tokens`` when all do);
- ``token_match``: the share of positions with the reference's token;
- ``kl``: the mean per-token KL divergence ``KL(reference || candidate)`` of the next-token distributions along
  the *reference's* continuation (teacher-forced, so every prompt contributes ``new_tokens`` comparable positions).
  The reference's distributions are kept whole when ``prompts x new_tokens x vocab`` is at most
  :data:`FULL_KL_ELEMENTS`; beyond that, over the reference's top :data:`TOP_TOKENS` tokens and one bin for the rest
  (``kl_bins`` says which), a lower bound of the full KL.

Greedy decoding runs its own loop with the model's cache (no ``generate`` configuration can stop it early at an
end-of-sequence token), in the model's dtype, batch by batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_fx.errors import BadOptionError
from moe_fx.evaluate.nll import EvalSet
from moe_fx.progress import progress_bar
from moe_fx.rewrite.teacher_cache import binned_logprobs

FULL_KL_ELEMENTS = 64 * 2**20
"""Above this many reference log-probabilities (prompts x new tokens x vocabulary), KL is taken over top-k bins."""
TOP_TOKENS = 256


@dataclass(frozen=True)
class GenerationReference:
    """The reference model's greedy continuations of the prompts and its next-token log-probabilities along them."""

    prompts: torch.Tensor
    """``[N, P]`` prompt tokens."""
    tokens: torch.Tensor
    """``[N, T]`` the reference's greedy continuation."""
    logprobs: torch.Tensor
    """``[N, T, V]`` (full) or ``[N, T, TOP_TOKENS + 1]`` (top tokens and the rest) float32 log-probabilities."""
    top_ids: torch.Tensor | None
    """``[N, T, TOP_TOKENS]`` the token ids of the kept bins, or None when the distributions are whole."""


def generation_prompts(eval_set: EvalSet, *, prompts: int, prompt_len: int) -> torch.Tensor:
    """``[prompts, prompt_len]``: the first ``prompt_len`` tokens of evaluation windows, taken round-robin across
    domains (in file order), so every domain is represented."""
    if prompts < 1 or prompt_len < 1:
        raise BadOptionError(f"generation prompts and prompt length must be positive, got {prompts} and {prompt_len}")
    per_domain = [w for _, w in sorted(eval_set.windows.items())]
    if prompt_len > min(w.shape[1] for w in per_domain):
        raise BadOptionError(f"generation prompts of {prompt_len} tokens are longer than the evaluation windows")
    rows = [w[i, :prompt_len] for i in range(max(w.shape[0] for w in per_domain)) for w in per_domain if i < w.shape[0]]
    if len(rows) < prompts:
        raise BadOptionError(f"{prompts} generation prompts asked, the evaluation text gives {len(rows)}: ask fewer or evaluate more windows")
    return torch.stack(rows[:prompts])


@torch.no_grad()
def greedy(model: nn.Module, prompts: torch.Tensor, new_tokens: int, *, batch_size: int = 8, show_progress: bool = False) -> torch.Tensor:
    """``[N, new_tokens]`` greedy continuations of ``prompts`` (all prompts the same length, no padding)."""
    device = next(model.parameters()).device
    out = []
    with progress_bar("generate", total=prompts.shape[0], unit="prompt", enabled=show_progress) as bar:
        for i in range(0, prompts.shape[0], batch_size):
            ids = prompts[i : i + batch_size].to(device)
            step = model(input_ids=ids, use_cache=True)
            picked = [step.logits[:, -1].argmax(-1, keepdim=True)]
            while len(picked) < new_tokens:
                step = model(input_ids=picked[-1], past_key_values=step.past_key_values, use_cache=True)
                picked.append(step.logits[:, -1].argmax(-1, keepdim=True))
            out.append(torch.cat(picked, dim=1).cpu())
            bar.update(ids.shape[0])
    return torch.cat(out)


@torch.no_grad()
def _logprobs(model: nn.Module, prompts: torch.Tensor, tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``[N, T, V]`` float32 next-token log-probabilities at the positions that predict ``tokens`` after ``prompts``."""
    device = next(model.parameters()).device
    p, t = prompts.shape[1], tokens.shape[1]
    out = []
    for i in range(0, prompts.shape[0], batch_size):
        ids = torch.cat([prompts[i : i + batch_size], tokens[i : i + batch_size]], dim=1).to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, p - 1 : p - 1 + t].float()
        out.append(F.log_softmax(logits, dim=-1).cpu())
    return torch.cat(out)


def _binned(logprobs: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """``[..., k + 1]`` log-probabilities of ``top_ids`` and of everything else together."""
    return binned_logprobs(logprobs.gather(-1, top_ids))


def reference(model: nn.Module, prompts: torch.Tensor, new_tokens: int = 32, *, batch_size: int = 8, show_progress: bool = False) -> GenerationReference:
    """The reference model's continuations and distributions, kept so the model itself need not stay in memory."""
    tokens = greedy(model, prompts, new_tokens, batch_size=batch_size, show_progress=show_progress)
    logprobs = _logprobs(model, prompts, tokens, batch_size)
    if logprobs.numel() <= FULL_KL_ELEMENTS:
        return GenerationReference(prompts, tokens, logprobs, None)
    top_ids = logprobs.topk(TOP_TOKENS, dim=-1).indices
    return GenerationReference(prompts, tokens, _binned(logprobs, top_ids), top_ids)


def agreement(model: nn.Module, ref: GenerationReference, *, batch_size: int = 8, show_progress: bool = False) -> dict:
    """How far ``model``'s greedy continuations follow ``ref``'s (see module doc)."""
    new_tokens = ref.tokens.shape[1]
    tokens = greedy(model, ref.prompts, new_tokens, batch_size=batch_size, show_progress=show_progress)
    same = tokens == ref.tokens
    prefix = torch.where(same.all(1), torch.tensor(new_tokens), (~same).int().argmax(1))
    logprobs = _logprobs(model, ref.prompts, ref.tokens, batch_size)
    if ref.top_ids is not None:
        logprobs = _binned(logprobs, ref.top_ids)
    kl = (ref.logprobs.exp() * (ref.logprobs - logprobs)).sum(-1)
    return {
        "prompts": int(ref.prompts.shape[0]), "prompt_tokens": int(ref.prompts.shape[1]), "new_tokens": new_tokens,
        "exact_match": float(same.all(1).float().mean()), "prefix_tokens": float(prefix.float().mean()),
        "token_match": float(same.float().mean()), "kl": float(kl.mean()),
        "kl_bins": "full" if ref.top_ids is None else f"top {TOP_TOKENS} + rest",
    }
