"""The passes a build script composes: Calibrate -> Score -> DropExperts (or MergeExperts)."""

from .calibrate import Calibrate
from .compensate import CompensateExperts
from .drop_experts import DropExperts, drop_experts
from .merge_experts import MergeExperts
from .score import Score
from .scorers import SCORERS, Scorer, Scores, register_scorer

__all__ = ["SCORERS", "Calibrate", "CompensateExperts", "DropExperts", "MergeExperts", "Score", "Scorer", "Scores", "drop_experts", "register_scorer"]
