"""The passes a build script composes: Calibrate -> Score -> DropExperts."""

from .calibrate import Calibrate
from .drop_experts import DropExperts, drop_experts
from .score import Score
from .scorers import SCORERS, Scorer, Scores, register_scorer

__all__ = ["SCORERS", "Calibrate", "DropExperts", "Score", "Scorer", "Scores", "drop_experts", "register_scorer"]
