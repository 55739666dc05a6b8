"""A per-model store of request log-likelihoods, so comparing several pruned models against one base (or
re-running with a larger ``--limit``) scores the base's requests once.

Entries are keyed by the request text itself, so a changed prompt is a new entry, never a stale hit. The
model key covers the checkpoint's weights, config and tokenizer (a content hash), the compute dtype and
device type, and the window length: anything that changes the numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from moe_fx.evaluate.zero_shot.tasks import Request
from moe_fx.formats.atomic import replace_atomically

SCORING_VERSION = 1
"""Bumped when the scoring rule changes, which invalidates every stored entry."""

FULL_HASH_BYTES = 2 << 30
"""Checkpoints up to this size are hashed whole; bigger ones by their headers plus sampled blocks."""

_SAMPLES, _SAMPLE_BYTES = 256, 4096


def default_cache_dir() -> Path:
    root = os.environ.get("MOE_FX_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moe_fx"
    return Path(root) / "zero_shot"


def checkpoint_fingerprint(path: str | Path) -> str:
    """Content hash of a checkpoint's weights, config and tokenizer files.

    Weights above :data:`FULL_HASH_BYTES` are hashed by size, safetensors header and 256 blocks spread over
    each file: reading 60 GB to key a cache would cost more than it saves; two different weights of the same
    shapes still differ in the sampled bytes unless they differ only in a few values.
    """
    path = Path(path)
    weights = sorted(path.glob("*.safetensors"))
    whole = sum(f.stat().st_size for f in weights) <= FULL_HASH_BYTES
    h = hashlib.sha256()
    for f in sorted(path.glob("*.json")) + weights:
        if f.name.startswith("report") or f.name == "moe_fx.json":
            continue  # what moe-fx writes about a run, not what the model computes
        size = f.stat().st_size
        h.update(f"{f.name}:{size}\n".encode())
        with f.open("rb") as fh:
            if f.suffix != ".safetensors" or whole:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
                continue
            header = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(header))
            for k in range(_SAMPLES):
                fh.seek(8 + header + (size - 8 - header - _SAMPLE_BYTES) * k // (_SAMPLES - 1))
                h.update(fh.read(_SAMPLE_BYTES))
    return h.hexdigest()[:24]


class LoglikCache:
    """Request -> ``(log-likelihood, greedy)`` for one model key, read at start and written back atomically."""

    def __init__(self, directory: str | Path, model_key: str):
        self.file = Path(directory) / f"{model_key}.json"
        self.entries: dict[str, list] = {}
        self.dirty = False
        if self.file.is_file():
            try:
                data = json.loads(self.file.read_text())
                if data.get("version") == SCORING_VERSION:
                    self.entries = data["entries"]
            except (OSError, ValueError, KeyError):
                self.entries = {}  # a damaged cache file is only a cache: start afresh

    @classmethod
    def for_checkpoint(cls, path: str | Path, *, dtype: str, device: str, max_length: int, directory: str | Path | None = None) -> LoglikCache:
        key = hashlib.sha256(f"{checkpoint_fingerprint(path)}|{dtype}|{device.split(':')[0]}|{max_length}".encode()).hexdigest()[:24]
        return cls(directory or default_cache_dir(), key)

    @staticmethod
    def key(request: Request) -> str:
        return hashlib.sha1(f"{request.context}\x00{request.continuation}".encode()).hexdigest()

    def get(self, request: Request) -> tuple[float, bool] | None:
        hit = self.entries.get(self.key(request))
        return (float(hit[0]), bool(hit[1])) if hit is not None else None

    def put(self, request: Request, result: tuple[float, bool]) -> None:
        self.entries[self.key(request)] = [result[0], result[1]]
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        self.file.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(self.file, lambda tmp: tmp.write_text(json.dumps({"version": SCORING_VERSION, "entries": self.entries})))
        self.dirty = False
