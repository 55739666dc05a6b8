"""The passes a build script composes: Calibrate -> Score -> DropExperts (or MergeExperts) / PruneChannels -> CompensateExperts -> Distill."""

from .calibrate import Calibrate
from .compensate import CompensateExperts
from .distill import Distill
from .drop_experts import DropExperts, drop_experts
from .merge_experts import MergeExperts
from .prune_channels import PruneChannels, prune_channels
from .score import Score
from .scorers import SCORERS, Scorer, Scores, register_scorer

__all__ = ["SCORERS", "Calibrate", "CompensateExperts", "Distill", "DropExperts", "MergeExperts", "PruneChannels", "Score", "Scorer", "Scores", "drop_experts", "prune_channels", "register_scorer"]
