"""Calibration across processes with torch.distributed (launched by ``torchrun``).

Every rank builds the same calibration windows (same data, same seed), forwards only its shard of them,
and the observers' accumulators are then combined with collectives: running sums are all-reduced (so the
statistics equal a single process's up to float summation order), and token reservoirs are merged into
one sample drawn from every rank in proportion to the tokens it saw. Everything after calibration
(scoring, plans, rewrites) is deterministic, so every rank computes the same result; rank 0 alone
evaluates and writes. Backend: NCCL when the model runs on CUDA, gloo otherwise.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT = timedelta(hours=3)
"""How long a rank waits at a collective: rank 0 alone evaluates before and after (a streamed evaluation of a
large model takes many minutes) while the others wait at the next reduction. torchrun still stops every rank
as soon as one fails."""


def init_from_env(device: str) -> bool:
    """Join the process group torchrun describes in the environment (``WORLD_SIZE`` > 1); return whether
    this process is one of several."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
    return True


def finish() -> None:
    """Wait until every rank has finished its work: a rank that is done early (only rank 0 evaluates and writes)
    must not leave the group while the others still use it. Called after success only: after an error the
    process exits at once and torchrun stops the other ranks, which may be waiting in another collective."""
    if active():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def shard(windows: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of the calibration windows (all of them in a single process)."""
    if not active():
        return windows
    return torch.tensor_split(windows, dist.get_world_size())[rank()]


def _comm(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the device the backend communicates from (CUDA for NCCL)."""
    return t.cuda() if dist.get_backend() == "nccl" else t.cpu()


def all_reduce_sum_(t: torch.Tensor) -> None:
    """Sum ``t`` over ranks, in place."""
    c = _comm(t)
    dist.all_reduce(c, op=dist.ReduceOp.SUM)
    t.copy_(c.to(t.device))


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    c = _comm(t.contiguous())
    out = [torch.empty_like(c) for _ in range(dist.get_world_size())]
    dist.all_gather(out, c)
    return [o.to(t.device) for o in out]


def merge_reservoirs(acc: dict[str, torch.Tensor], keys: list[str], seen_key: str, samples: int, seed: int) -> None:
    """Replace each rank's reservoir of ``samples`` tokens (rows of ``acc[k]`` for ``k`` in ``keys``) with
    one sample of the union: rank ``r`` contributes a seeded random subset of its reservoir, in proportion
    to the tokens it saw (largest remainders); ``acc[seen_key]`` becomes the total. Same result on every rank."""
    seen = [int(s) for s in _gather(acc[seen_key].reshape(1))]
    total = sum(seen)
    quota_f = [samples * s / max(total, 1) for s in seen]
    quota = [min(int(q), min(s, samples)) for q, s in zip(quota_f, seen)]
    room = min(samples, total) - sum(quota)
    for r in sorted(range(len(seen)), key=lambda r: (quota[r] - quota_f[r], r)):
        if room <= 0:
            break
        if quota[r] < min(seen[r], samples):
            quota[r] += 1
            room -= 1
    gen = torch.Generator().manual_seed(seed)
    picks = [torch.randperm(min(s, samples), generator=gen)[:q].sort().values for s, q in zip(seen, quota)]
    for key in keys:
        parts = _gather(acc[key])
        merged = torch.cat([p[i.to(p.device)] for p, i in zip(parts, picks)])
        acc[key].zero_()
        acc[key][: len(merged)] = merged
    acc[seen_key].fill_(total)


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (itself in a single process)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
