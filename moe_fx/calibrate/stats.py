"""CalibrationStats: running sums recorded per MoE block, the input of every scorer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class CalibrationStats:
    """Per block path, named accumulators (float64 running sums, never per-token activations)."""

    per_block: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    tokens: int = 0
    sequences: int = 0
    seq_len: int = 0
    fingerprint: str = ""
    source: str = ""
    seconds: float = 0.0
    released: tuple[str, ...] = ()
    """Names of statistics that were recorded and have since been freed (a streaming run keeps none after each
    layer): listed in the summary with those still held."""

    def get(self, block: str, name: str) -> torch.Tensor:
        try:
            return self.per_block[block][name]
        except KeyError:
            have = sorted(self.per_block.get(block, {}))
            raise KeyError(f"calibration statistic {name!r} was not recorded for {block} (recorded: {have}); add its observer to Calibrate") from None

    def summary(self) -> dict:
        return {
            "tokens": self.tokens,
            "sequences": self.sequences,
            "seq_len": self.seq_len,
            "fingerprint": self.fingerprint,
            "source": self.source,
            "seconds": round(self.seconds, 3),
            "statistics": sorted({k for acc in self.per_block.values() for k in acc} | set(self.released)),
        }
