"""Random scores: the baseline every method must beat. Seeded per block, so plans are reproducible."""

from __future__ import annotations

import hashlib

import torch

from moe_fx.score.base import Scorer, register_scorer


@register_scorer
class RandomScorer(Scorer):
    name = "random"

    def score_block(self, stats, block):
        digest = hashlib.sha256(f"{self.seed}:{block.path}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        return torch.rand(block.num_experts, generator=gen, dtype=torch.float64)
