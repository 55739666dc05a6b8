"""The passes a build script composes: Calibrate -> [CacheTeacher] -> Score -> DropExperts (or MergeExperts, SubstituteExperts) / PruneChannels -> CompensateExperts -> Distill -> QuantizeExperts;
ChooseRecipe keeps the best of several such recipes."""

from moe_fx.calibrate import Calibrate
from moe_fx.plan.choose import ChooseRecipe
from moe_fx.plan.eep import EvolutionarySearch
from moe_fx.rewrite.compensate import CompensateExperts
from moe_fx.rewrite.distill import Distill
from moe_fx.rewrite.drop_experts import DropExperts, drop_experts
from moe_fx.rewrite.merge_experts import MergeExperts
from moe_fx.rewrite.prune_channels import PruneChannels, prune_channels
from moe_fx.rewrite.quantize_experts import QuantizeExperts, quantize_experts_
from moe_fx.rewrite.substitute_experts import SubstituteExperts
from moe_fx.rewrite.teacher_cache import CacheTeacher
from moe_fx.score import SCORERS, Scorer, Scores, register_scorer
from moe_fx.score.score_pass import Score

__all__ = [
    "SCORERS",
    "CacheTeacher",
    "Calibrate",
    "ChooseRecipe",
    "CompensateExperts",
    "Distill",
    "DropExperts",
    "EvolutionarySearch",
    "MergeExperts",
    "PruneChannels",
    "QuantizeExperts",
    "Score",
    "Scorer",
    "Scores",
    "SubstituteExperts",
    "drop_experts",
    "prune_channels",
    "quantize_experts_",
    "register_scorer",
]
