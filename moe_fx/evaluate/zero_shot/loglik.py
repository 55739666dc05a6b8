"""Log-likelihood of continuations given contexts, tokenised and scored as lm-evaluation-harness's HF model
does, so the same model gives the same numbers here as there.

* Trailing spaces of the context move to the continuation; the pair is encoded whole and the context's
  tokens are cut off the front (so a word split across the boundary is tokenised as in running text).
* An empty context is replaced by the prefix token (BOS, else EOS).
* Context and continuation are cut from the left to ``max_length + 1`` tokens; the last one is not fed.
* Sequences are batched longest first, up to a token budget (many short BLiMP sentences per batch, few
  long HellaSwag contexts), padded on the right (a causal model's earlier positions never see the
  padding, so no attention mask is needed and no position shifts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moe_fx.evaluate.zero_shot.tasks import Request
from moe_fx.model.mode import eval_mode
from moe_fx.progress import progress_bar

Encoder = Callable[[str], list[int]]


def tokenizer_encoder(tokenizer) -> Encoder:
    """Text -> token ids without special tokens (lm-eval's ``tok_encode`` for causal models)."""
    return lambda text: tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def prefix_token_id(tokenizer) -> int:
    """What stands in for an empty context: BOS where the tokenizer has one, else EOS."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to stand in for an empty context")
    return token


def encode_pair(encode: Encoder, request: Request, prefix_id: int) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of one request."""
    context, continuation = request.context, request.continuation
    if context == "":
        return [prefix_id], encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(context + continuation)
    context_ids = encode(context)
    return context_ids, whole[len(context_ids):]


def max_length_of(model: nn.Module, default: int = 2048) -> int:
    """The context the model was built for (lm-eval's rule: the config's position limit, else 2048)."""
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)()
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


@torch.no_grad()
def loglikelihoods(
    model: nn.Module,
    encode: Encoder,
    requests: Sequence[Request],
    *,
    prefix_id: int,
    batch_tokens: int = 4096,
    max_length: int | None = None,
    show_progress: bool = True,
    desc: str = "loglikelihood",
) -> list[tuple[float, bool]]:
    """Per request: ``(sum of log p(continuation tokens), whether greedy decoding reproduces them)``.
    ``batch_tokens``: padded tokens per forward pass (at least one sequence)."""
    max_length = max_length or max_length_of(model)
    device = next(model.parameters()).device
    encoded = []
    for r in requests:
        context_ids, continuation_ids = encode_pair(encode, r, prefix_id)
        if not continuation_ids:
            raise ValueError(f"request with an empty continuation: {r.continuation!r}")
        full = (context_ids + continuation_ids)[-(max_length + 1):]
        encoded.append((full[:-1], continuation_ids[-(len(full) - 1):]))  # a continuation longer than the window is cut too
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    results: list[tuple[float, bool] | None] = [None] * len(encoded)
    with eval_mode(model), progress_bar(desc, total=len(order), unit="req", enabled=show_progress) as bar:
        start = 0
        while start < len(order):
            width = len(encoded[order[start]][0])  # the longest of the batch: requests are sorted
            batch = order[start : start + max(1, batch_tokens // width)]
            start += len(batch)
            inputs = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):
                ids = encoded[i][0]
                inputs[row, : len(ids)] = torch.tensor(ids)
            logits = model(input_ids=inputs.to(device), use_cache=False).logits
            for row, i in enumerate(batch):
                ids, target = encoded[i]
                span = logits[row, len(ids) - len(target) : len(ids)]
                scores = F.log_softmax(span.to(torch.promote_types(span.dtype, torch.float32)), dim=-1)
                target_t = torch.tensor(target, device=scores.device)
                greedy = bool((scores.argmax(-1) == target_t).all())
                results[i] = (float(scores.gather(-1, target_t[:, None]).sum()), greedy)
            bar.update(len(batch))
    return results  # type: ignore[return-value]
