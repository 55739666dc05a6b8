"""Scorers: calibration statistics in, one importance score per expert (or channel) out, higher = keep.

Every scorer is a class registered by name with :func:`register_scorer` (:mod:`moe_fx.score.base`); it declares
the statistics it reads so a missing observer is reported before any work. New method = one file in this
package, imported below. :class:`~moe_fx.score.score_pass.Score` is the pass that runs one.
"""

from moe_fx.score import channel, frequency, naee, novice, obs, random, reap, shape  # noqa: F401  (registers the built-in scorers)
from moe_fx.score.base import SCORERS, Scorer, Scores, get_scorer, register_scorer

__all__ = ["SCORERS", "Scorer", "Scores", "get_scorer", "register_scorer"]
