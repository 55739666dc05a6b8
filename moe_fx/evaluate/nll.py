"""Held-out quality and size: per-domain next-token NLL / perplexity, parameter and byte counts.

NLL windows are taken per domain in file order (no shuffling), so two models evaluated with the same
options see exactly the same tokens and their deltas are paired. With a stride shorter than the window
(sliding-window perplexity) consecutive windows overlap: each token is still scored once, in the first
window where it is new, with up to ``seq_len - stride`` tokens of extra context before it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moe_fx.calibrate.data import Document, as_documents, pack
from moe_fx.errors import BadOptionError, CalibrationDataError, out_of_memory
from moe_fx.formats.shards import safetensors_header
from moe_fx.model.mode import eval_mode
from moe_fx.progress import progress_bar


@dataclass(frozen=True)
class EvalSet:
    """Token windows per domain, built once and reused for every model compared."""

    windows: dict[str, torch.Tensor]
    source: str
    overlap: int = 0
    """Tokens each window after a domain's first shares with the one before (``seq_len - stride``): read as
    context, not scored again."""

    @property
    def num_tokens(self) -> int:
        return sum(w.numel() for w in self.windows.values())

    @property
    def scored_tokens(self) -> int:
        """Tokens whose prediction is scored: all but each window's first, less the overlap already scored."""
        skip = max(self.overlap - 1, 0)
        return sum(w.shape[0] * (w.shape[1] - 1) - (w.shape[0] - 1) * skip for w in self.windows.values())


def build_eval_set(source: str | Path | Sequence[str] | Sequence[Document], tokenizer, *, seq_len: int = 512, seqs_per_domain: int = 8,
                   stride: int | None = None) -> EvalSet:
    """``seqs_per_domain`` windows of ``seq_len`` tokens per domain, consecutive windows ``stride`` apart
    (default ``seq_len``: no overlap)."""
    stride = seq_len if stride is None else stride
    if not 0 < stride <= seq_len:
        raise BadOptionError(f"evaluation stride {stride} must be in [1, seq_len={seq_len}]")
    docs, desc = as_documents(source)
    by_domain: dict[str, list[Document]] = defaultdict(list)
    for d in docs:
        by_domain[d.domain].append(d)
    windows = {}
    for domain, ds in sorted(by_domain.items()):
        # the token stream cut in whole strides, as long as the windows need, then the (overlapping) windows over it
        chunk = seq_len if stride == seq_len else stride
        needed = seq_len + (seqs_per_domain - 1) * stride
        stream = pack(tokenizer, ds, seq_len=chunk, max_tokens=-(-needed // chunk) * chunk, seed=None).reshape(-1)
        if stream.numel() < seq_len:
            raise CalibrationDataError(f"domain {domain}: {stream.numel()} tokens, fewer than one window of {seq_len}; give more text or a smaller --eval-seq-len")
        windows[domain] = stream.unfold(0, seq_len, stride)[:seqs_per_domain].contiguous()
    return EvalSet(windows, desc, overlap=seq_len - stride)


def next_token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross entropy of ``logits [..., V]`` against token ids ``targets [...]`` (-100: not scored), refusing in one line
    ids the model has no output for (its head is not over the tokenizer's vocabulary) instead of an IndexError."""
    largest = int(targets.max()) if targets.numel() else -1  # no device sync where the targets are still on the host
    if largest >= logits.shape[-1]:
        raise BadOptionError(f"the model predicts {logits.shape[-1]} classes, but the data holds token id {largest}: its head is not a "
                             "next-token head over this tokenizer's vocabulary, which NLL evaluation, EEP and gradient scores need")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1).to(logits.device), reduction="sum", ignore_index=-100)


@torch.no_grad()
def nll_sum(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 8, bar=None, overlap: int = 0) -> tuple[float, int]:
    """Summed next-token NLL over token windows ``[N, L]`` and the number of predicted tokens. ``overlap``:
    leading tokens of every window but the first that the previous window already scored."""
    device = next(model.parameters()).device
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0  # summed on the device: one sync, at the end
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i : i + batch_size]
        try:
            logits = model(input_ids=batch.to(device), use_cache=False).logits[:, :-1].float()
        except torch.OutOfMemoryError:
            raise out_of_memory("evaluation", device, tuple(batch.shape), "lower --batch-size or --eval-seq-len") from None
        targets = batch[:, 1:].clone()  # on the host: its checks and count read no device value
        if overlap > 1:  # target j predicts token j + 1: tokens [0, overlap) of a later window were scored before
            targets[0 if i > 0 else 1 :, : overlap - 1] = -100
        total += next_token_nll(logits, targets).double()
        count += int((targets != -100).sum())
        if bar is not None:
            bar.update(batch.numel())
    return float(total), count


def evaluate_nll(model: nn.Module, eval_set: EvalSet, *, batch_size: int = 8, show_progress: bool = True) -> dict[str, dict[str, float]]:
    """Mean next-token NLL and perplexity per domain, plus ``mean`` (over domains) and ``all`` (over tokens)."""
    results: dict[str, dict[str, float]] = {}
    total_nll, total_tok = 0.0, 0
    with eval_mode(model), progress_bar("evaluate", total=eval_set.num_tokens, unit="tok", enabled=show_progress) as bar:
        for domain, windows in eval_set.windows.items():
            s, n = nll_sum(model, windows, batch_size=batch_size, bar=bar, overlap=eval_set.overlap)
            results[domain] = {"nll": s / n, "ppl": math.exp(s / n), "tokens": n}
            total_nll, total_tok = total_nll + s, total_tok + n
    mean = sum(r["nll"] for r in results.values()) / len(results)
    results["mean"] = {"nll": mean, "ppl": math.exp(mean), "tokens": total_tok}
    results["all"] = {"nll": total_nll / total_tok, "ppl": math.exp(total_nll / total_tok), "tokens": total_tok}
    return results


def model_size(model: nn.Module) -> dict[str, int]:
    """Parameter count and bytes of the parameters and persistent buffers (tied tensors counted once)."""
    seen, params, nbytes = set(), 0, 0
    for t in list(model.parameters()) + [b for b in model.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        nbytes += t.numel() * t.element_size()
        if isinstance(t, nn.Parameter):
            params += t.numel()
    return {"params": params, "bytes": nbytes}


def checkpoint_size(path: str | Path) -> dict[str, int]:
    """Stored values and bytes of a checkpoint's safetensors files, read from their headers (no tensor is
    loaded: how a streaming run sizes a model it never holds)."""
    values, nbytes = 0, 0
    for f in Path(path).glob("*.safetensors"):
        for entry in safetensors_header(f)[0].values():
            values += math.prod(entry["shape"])
            nbytes += entry["data_offsets"][1] - entry["data_offsets"][0]
    return {"params": values, "bytes": nbytes}


def disk_size(path: str | Path) -> int:
    """Bytes of the weight files of a checkpoint directory."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
