"""Calibration and evaluation text: read documents, tokenize, pack into fixed-length token batches.

Sources: a ``.txt`` file (one document per blank-line-separated paragraph block), a ``.jsonl``/``.jsonl.gz``
file with a ``text`` field (and optional ``domain``), a list of strings, or a ready ``LongTensor [N, L]``.
Packing concatenates documents (each followed by EOS) and cuts the stream into ``seq_len`` windows, so no
token is padding. Document order is shuffled with the seed, so a fixed seed gives the same tokens.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_fx.errors import CalibrationDataError


@dataclass(frozen=True)
class Document:
    text: str
    domain: str = "all"


@dataclass(frozen=True)
class TokenBatch:
    """Packed token windows ``[N, L]`` plus a fingerprint of exactly these tokens."""

    input_ids: torch.Tensor
    source: str

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.input_ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]

    def batches(self, batch_size: int) -> Iterable[torch.Tensor]:
        for i in range(0, self.input_ids.shape[0], batch_size):
            yield self.input_ids[i : i + batch_size]


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open("r", encoding="utf-8")


def read_documents(path: str | Path) -> list[Document]:
    """Read every non-empty document of a ``.txt`` or ``.jsonl(.gz)`` file, with clear errors."""
    p = Path(path)
    if not p.is_file():
        raise CalibrationDataError(f"{p}: no such file (give a .txt or .jsonl(.gz) file of text)")
    is_jsonl = ".jsonl" in p.suffixes or ".json" in p.suffixes
    docs: list[Document] = []
    try:
        with _open_text(p) as f:
            if is_jsonl:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise CalibrationDataError(f"{p}:{lineno}: not valid JSON ({exc.msg})") from None
                    text = row.get("text") if isinstance(row, dict) else None
                    if not isinstance(text, str):
                        raise CalibrationDataError(f'{p}:{lineno}: each JSON line needs a "text" string field')
                    if text.strip():
                        docs.append(Document(text, str(row.get("domain", "all"))))
            else:
                docs = [Document(block) for block in f.read().split("\n\n") if block.strip()]
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise CalibrationDataError(f"{p}: unreadable ({type(exc).__name__}: {exc})") from None
    if not docs:
        raise CalibrationDataError(f"{p}: holds no text")
    return docs


def as_documents(source: str | Path | Sequence[str] | Sequence[Document]) -> tuple[list[Document], str]:
    """Documents and a short description of where they came from."""
    if isinstance(source, (str, Path)):
        return read_documents(source), str(source)
    docs = [d if isinstance(d, Document) else Document(str(d)) for d in source]
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise CalibrationDataError("the list of calibration texts is empty")
    return docs, f"{len(docs)} texts"


def split_holdout(docs: list[Document], fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Split documents into (calibration, held-out) disjoint sets after a seeded shuffle."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_hold = max(1, int(round(len(docs) * fraction))) if len(docs) > 1 else 0
    hold = set(order[len(order) - n_hold :])
    return [d for i, d in enumerate(docs) if i not in hold], [d for i, d in enumerate(docs) if i in hold]


def pack(
    tokenizer,
    docs: Sequence[Document],
    *,
    seq_len: int,
    max_tokens: int | None,
    seed: int | None,
    max_sequences: int | None = None,
) -> torch.Tensor:
    """Tokenize documents (shuffled when ``seed`` is given) until ``max_tokens``; return ``[N, seq_len]``."""
    if seq_len < 2:
        raise CalibrationDataError(f"seq_len must be at least 2, got {seq_len}")
    order = list(range(len(docs)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    limit = max_tokens if max_tokens is not None else float("inf")
    if max_sequences is not None:
        limit = min(limit, max_sequences * seq_len)
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for i in order:
        ids = tokenizer(docs[i].text, add_special_tokens=False, verbose=False)["input_ids"]
        stream.extend(ids + ([eos] if eos is not None else []))
        if len(stream) >= limit:
            break
    n = int(min(len(stream), limit)) // seq_len
    if n == 0:
        raise CalibrationDataError(
            f"the text holds {len(stream)} tokens, fewer than one window of seq_len={seq_len}; give more text or a smaller --seq-len"
        )
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def split_fitness(windows: torch.Tensor, fitness_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold the last windows (about ``fitness_tokens`` tokens, at least one window) out of calibration windows,
    as the fitness set of a plan search: the search then never scores plans on the tokens that scored experts."""
    n = max(1, round(fitness_tokens / windows.shape[1]))
    if n >= windows.shape[0]:
        raise CalibrationDataError(
            f"holding out {fitness_tokens} fitness tokens leaves no calibration windows ({windows.shape[0]} of "
            f"{windows.shape[1]} tokens); give more calibration text or fewer fitness tokens"
        )
    return windows[:-n], windows[-n:]


def calibration_tokens(
    source,
    tokenizer=None,
    *,
    seq_len: int = 512,
    max_tokens: int | None = 200_000,
    seed: int = 0,
) -> TokenBatch:
    """Calibration tokens from any supported source (a LongTensor ``[N, L]`` is used as is)."""
    if isinstance(source, TokenBatch):
        return source
    if isinstance(source, torch.Tensor):
        if source.dtype not in (torch.int32, torch.int64) or source.ndim != 2 or source.numel() == 0:
            raise CalibrationDataError(f"token tensor must be a non-empty integer tensor [N, L], got {tuple(source.shape)} {source.dtype}")
        return TokenBatch(source.long(), f"tensor{tuple(source.shape)}")
    if tokenizer is None:
        raise CalibrationDataError("text calibration data needs a tokenizer")
    docs, desc = as_documents(source)
    return TokenBatch(pack(tokenizer, docs, seq_len=seq_len, max_tokens=max_tokens, seed=seed), desc)
