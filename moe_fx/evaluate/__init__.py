"""Evaluation and reports: held-out NLL per domain and model sizes (:mod:`~moe_fx.evaluate.nll`), zero-shot
tasks (:mod:`~moe_fx.evaluate.zero_shot`), ``report.md`` / plots (:mod:`~moe_fx.evaluate.report`) and tables."""

from moe_fx.evaluate.nll import EvalSet, build_eval_set, checkpoint_size, disk_size, evaluate_nll, model_size, nll_sum

__all__ = ["EvalSet", "build_eval_set", "checkpoint_size", "disk_size", "evaluate_nll", "model_size", "nll_sum"]
