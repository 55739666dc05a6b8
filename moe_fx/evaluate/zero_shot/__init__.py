"""Zero-shot log-likelihood evaluation (BLiMP, LAMBADA, HellaSwag, PIQA, ARC, COPA, WinoGrande, BoolQ,
OpenBookQA) with lm-evaluation-harness's prompts and metrics, offline, on any causal LM."""

from moe_fx.evaluate.zero_shot.cache import LoglikCache, checkpoint_fingerprint
from moe_fx.evaluate.zero_shot.evaluate import evaluate_tasks, task_metrics
from moe_fx.evaluate.zero_shot.tasks import DEFAULT_TASKS, TASKS, Item, Request, read_items, resolve_tasks

__all__ = ["DEFAULT_TASKS", "TASKS", "Item", "LoglikCache", "Request", "checkpoint_fingerprint", "evaluate_tasks",
           "read_items", "resolve_tasks", "task_metrics"]
