"""The unpruned model's next-token distributions, cached on disk as their top-k, so that :class:`Distill` trains
the pruned model without the teacher in memory.

What: for every calibration window and position, the teacher's ``top_k`` most likely tokens (all of them where
the head has fewer outputs) and their log-probabilities, in two memory-mapped ``.npy`` files beside the windows'
token ids (``windows.npy``, ``indices.npy`` int32 ``[N, L, k]``, ``logprobs.npy`` float32 ``[N, L, k]``,
``cache.json``). :func:`topk_kl` is
the loss Distill trains on with it: the KL divergence between the two distributions coarsened to ``k + 1`` bins
(the teacher's k tokens, and one bin for the rest of the vocabulary). It equals the full KL when the teacher's
tail holds no mass and is a lower bound of it otherwise.

Why: distilling from the teacher model holds it beside the student (twice the weights), which does not fit one
device for the models people prune. The cache costs ``8 k`` bytes a token on disk (k = 64: 512 bytes; 200 k
calibration tokens: 100 MB) and one teacher forward per window, made once: by the model itself before the
pruning passes (:class:`CacheTeacher`), or by a streamed prune, whose calibration carries the unpruned model's
hidden states through the last layer anyway. Training memory is then the student and its trainable state.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moe_fx.calibrate.data import calibration_tokens
from moe_fx.errors import BadOptionError
from moe_fx.model.mode import eval_mode
from moe_fx.pipeline import MoEState, Pass, PassResult
from moe_fx.progress import progress_bar

__all__ = ["CacheTeacher", "TeacherCache", "binned_logprobs", "topk_kl", "topk_targets"]

FORMAT = "moe_fx.teacher_cache/1"


def topk_targets(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely tokens of each position's distribution and their log-probabilities (float32)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    values, indices = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return indices.to(torch.int32), values


def binned_logprobs(logp_k: torch.Tensor) -> torch.Tensor:
    """``[..., k + 1]``: the log-probabilities of k tokens and, last, of the rest of the vocabulary together
    (log(1 - sum(exp(logp_k))), computed without cancellation near 1): a distribution coarsened to k + 1 bins,
    whose KL is a lower bound of the full one (here and in :mod:`moe_fx.evaluate.generation`)."""
    covered = torch.logsumexp(logp_k, dim=-1).clamp(max=-1e-9)  # a rounding excess over 1 counts as no tail
    return torch.cat([logp_k, torch.log(-torch.expm1(covered)).unsqueeze(-1)], dim=-1)


def topk_kl(student_logits: torch.Tensor, indices: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ``KL(teacher || student)`` over the teacher's ``k`` cached tokens plus one bin for the
    rest of the vocabulary, in nats, float32. ``student_logits [..., V]``, ``indices``/``teacher_logp [..., k]``."""
    s = F.log_softmax(student_logits.float().flatten(0, -2), dim=-1)
    t = binned_logprobs(teacher_logp.float().flatten(0, -2))
    s = binned_logprobs(s.gather(-1, indices.flatten(0, -2).long()))
    return (t.exp() * (t - s)).sum(-1).mean()


@dataclass
class TeacherCache:
    """A cache directory (see the module doc): the windows ``[N, L]`` and per position the teacher's top-k."""

    path: Path
    windows: torch.Tensor
    indices: np.ndarray | None
    logprobs: np.ndarray | None
    requested_top_k: int = 64
    """The k asked for; the files hold ``min(k, V)`` per position, allocated by the first :meth:`write`, when the
    teacher's width ``V`` is known (a classifier head may have fewer classes than k)."""
    _remove: weakref.finalize | None = field(default=None, repr=False, compare=False)
    """For a temporary cache: removes its directory on :meth:`discard`, when the cache is collected, or at exit,
    so a pipeline that fails between CacheTeacher and Distill leaves no files behind."""

    @property
    def top_k(self) -> int:
        return self.requested_top_k if self.indices is None else self.indices.shape[-1]

    @property
    def temporary(self) -> bool:
        """Made in the system's temporary directory (``create(None, ...)``, what :class:`CacheTeacher` does by default)."""
        return self._remove is not None

    @classmethod
    def create(cls, path: str | Path | None, windows: torch.Tensor, top_k: int) -> TeacherCache:
        """An empty cache for ``windows`` at ``path`` (a new directory; None: a temporary one)."""
        if top_k < 1:
            raise BadOptionError(f"teacher cache: top_k must be positive, got {top_k}")
        temporary = path is None
        path = Path(tempfile.mkdtemp(prefix="moe_fx-teacher-")) if temporary else Path(path)
        path.mkdir(parents=True, exist_ok=True)
        np.save(path / "windows.npy", windows.numpy().astype(np.int64))
        cache = cls(path, windows, None, None, top_k)
        if temporary:
            cache._remove = weakref.finalize(cache, shutil.rmtree, path, True)
        return cache

    @classmethod
    def open(cls, path: str | Path) -> TeacherCache:
        """A cache written before (``cache.json`` marks it complete)."""
        path = Path(path)
        meta = path / "cache.json"
        if not meta.is_file() or json.loads(meta.read_text()).get("format") != FORMAT:
            raise BadOptionError(f"{path}: not a complete teacher cache (no {meta.name} of format {FORMAT})")
        windows = torch.from_numpy(np.load(path / "windows.npy"))
        indices = np.load(path / "indices.npy", mmap_mode="r")
        return cls(path, windows, indices, np.load(path / "logprobs.npy", mmap_mode="r"), indices.shape[-1])

    def _allocate(self, k: int) -> None:
        shape = (*self.windows.shape, k)
        self.indices = np.lib.format.open_memmap(self.path / "indices.npy", mode="w+", dtype=np.int32, shape=shape)
        self.logprobs = np.lib.format.open_memmap(self.path / "logprobs.npy", mode="w+", dtype=np.float32, shape=shape)

    def write(self, rows: slice, logits: torch.Tensor) -> None:
        """Store the teacher's top-k of ``logits [rows, L, V]`` for windows ``rows``."""
        if self.indices is None:
            self._allocate(min(self.requested_top_k, logits.shape[-1]))
        idx, logp = topk_targets(logits, self.top_k)
        self.indices[rows] = idx.cpu().numpy()
        self.logprobs[rows] = logp.cpu().numpy()

    def finish(self, **meta: Any) -> None:
        """Flush the files and mark the cache complete (with ``meta``: where it came from)."""
        if self.indices is None:  # no window written (an empty cache)
            self._allocate(self.requested_top_k)
        self.indices.flush()
        self.logprobs.flush()
        n, length, k = self.indices.shape
        (self.path / "cache.json").write_text(json.dumps({"format": FORMAT, "windows": n, "seq_len": length, "top_k": k, **meta}, indent=1) + "\n")

    def summary(self) -> dict:
        """Its size, and the teacher's mean probability mass inside the cached top-k (1.0: the loss is the full KL)."""
        n, length, k = self.indices.shape
        covered = float(np.exp(self.logprobs, dtype=np.float64).sum(-1).mean()) if n else 1.0
        return {"windows": n, "seq_len": length, "top_k": k, "bytes": self.indices.nbytes + self.logprobs.nbytes,
                "mean_top_k_mass": round(covered, 6)}

    def targets(self, rows: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached ``(indices, logprobs)`` of windows ``rows``, on ``device``."""
        order = np.asarray(rows)
        return (torch.from_numpy(np.ascontiguousarray(self.indices[order])).to(device),
                torch.from_numpy(np.ascontiguousarray(self.logprobs[order])).to(device))

    def discard(self) -> None:
        """Remove a temporary cache's files (a cache at a path the caller chose is kept)."""
        if self._remove is not None:
            self._remove()


@torch.no_grad()
def fill_cache(cache: TeacherCache, model: nn.Module, batch_size: int, show_progress: bool = True) -> None:
    """Run ``model`` over the cache's windows and store its top-k (the teacher pass of :class:`CacheTeacher`)."""
    device = next(model.parameters()).device
    n = cache.windows.shape[0]
    with eval_mode(model), progress_bar("teacher", total=n, unit="window", enabled=show_progress) as bar:
        for start in range(0, n, batch_size):
            rows = slice(start, min(n, start + batch_size))
            cache.write(rows, model(input_ids=cache.windows[rows].to(device), use_cache=False).logits)
            bar.update(rows.stop - rows.start)


@dataclass
class CacheTeacher(Pass):
    """Cache the model's top-k next-token distributions on ``data`` before it is pruned, for a later
    ``Distill(teacher="cached")`` (see the module doc): ``compose(Calibrate(data), CacheTeacher(data), Score("reap"),
    DropExperts(ratio=0.5), Distill(teacher="cached"))`` distills without a second copy of the model.

    ``data`` / ``tokenizer`` / ``seq_len`` / ``max_tokens`` / ``seed``: the windows, as :class:`Distill` takes them
    (they are stored with the cache, so Distill trains on exactly these). ``path``: where to keep the cache (None:
    a temporary directory, removed after Distill)."""

    data: Any = None
    tokenizer: Any = None
    seq_len: int = 512
    max_tokens: int | None = 200_000
    seed: int = 0
    top_k: int = 64
    batch_size: int = 8
    path: str | Path | None = None
    show_progress: bool = True
    name = "cache_teacher"

    def run(self, model: nn.Module, state: MoEState) -> PassResult:
        if self.data is None:
            raise BadOptionError("CacheTeacher needs data= (the windows Distill will train on)")
        if self.batch_size < 1:
            raise BadOptionError(f"CacheTeacher: batch_size must be positive, got {self.batch_size}")
        windows = calibration_tokens(self.data, self.tokenizer, seq_len=self.seq_len, max_tokens=self.max_tokens, seed=self.seed).input_ids
        cache = TeacherCache.create(self.path, windows, self.top_k)
        try:
            fill_cache(cache, model, self.batch_size, self.show_progress)
            cache.finish(source="model before pruning")
        except BaseException:
            cache.discard()
            raise
        state.teacher_cache = cache
        return PassResult(model, False, cache.summary())
