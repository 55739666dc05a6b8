"""Held-out quality and size: per-domain next-token NLL / perplexity, parameter and byte counts.

NLL windows are taken per domain in file order (no shuffling), so two models evaluated with the same
options see exactly the same tokens and their deltas are paired.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import Document, as_documents, pack
from .progress import progress_bar


@dataclass(frozen=True)
class EvalSet:
    """Token windows per domain, built once and reused for every model compared."""

    windows: dict[str, torch.Tensor]
    source: str

    @property
    def num_tokens(self) -> int:
        return sum(w.numel() for w in self.windows.values())


def build_eval_set(source: str | Path | Sequence[str] | Sequence[Document], tokenizer, *, seq_len: int = 512, seqs_per_domain: int = 8) -> EvalSet:
    docs, desc = as_documents(source)
    by_domain: dict[str, list[Document]] = defaultdict(list)
    for d in docs:
        by_domain[d.domain].append(d)
    windows = {
        domain: pack(tokenizer, ds, seq_len=seq_len, max_tokens=None, seed=None, max_sequences=seqs_per_domain)
        for domain, ds in sorted(by_domain.items())
    }
    return EvalSet(windows, desc)


@torch.no_grad()
def nll_sum(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 8, bar=None) -> tuple[float, int]:
    """Summed next-token NLL over token windows ``[N, L]`` and the number of predicted tokens."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i : i + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
        count += batch[:, 1:].numel()
        if bar is not None:
            bar.update(batch.numel())
    return total, count


def evaluate_nll(model: nn.Module, eval_set: EvalSet, *, batch_size: int = 8, show_progress: bool = True) -> dict[str, dict[str, float]]:
    """Mean next-token NLL and perplexity per domain, plus ``mean`` (over domains) and ``all`` (over tokens)."""
    was_training = model.training
    model.eval()
    results: dict[str, dict[str, float]] = {}
    total_nll, total_tok = 0.0, 0
    try:
        with progress_bar("evaluate", total=eval_set.num_tokens, unit="tok", enabled=show_progress) as bar:
            for domain, windows in eval_set.windows.items():
                s, n = nll_sum(model, windows, batch_size=batch_size, bar=bar)
                results[domain] = {"nll": s / n, "ppl": math.exp(s / n), "tokens": n}
                total_nll, total_tok = total_nll + s, total_tok + n
    finally:
        model.train(was_training)
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
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, entry in header.items():
            if name != "__metadata__":
                values += math.prod(entry["shape"])
                nbytes += entry["data_offsets"][1] - entry["data_offsets"][0]
    return {"params": values, "bytes": nbytes}


def disk_size(path: str | Path) -> int:
    """Bytes of the weight files of a checkpoint directory."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
