"""Named pruning recipes, so a user does not have to know the best combination of options: ``moe-fx prune
--preset NAME`` (and :func:`preset_options` for scripts) expands to the options the measurements chose.

What chose them (``docs/benchmarks/quality.md``; trained qwen3moe-bench, held-out valid split, Δ NLL against
REAP's on the same calibration tokens):

- ``best-oneshot``: EEP (global allocation) + compensation, the best pipeline without training at both budgets
  measured: 0.73x REAP's loss at 25% of the experts dropped and 0.59x at 50% (REAP + compensation: 0.83x and
  0.66x). EEP searches over the whole model, so a streamed prune (a model larger than the device) takes the
  best pipeline that streams, REAP + compensation.
- ``best``: ``best-oneshot`` then 200 steps of distillation (lr 3e-4, chosen on held-out train windows):
  0.37x REAP's loss at 25%. Streamed, REAP + compensation, then 200 steps distilled from the unpruned model's
  top-64 distributions cached by the streamed pass (the teacher is never in memory): 0.44x.

Both are expert-pruning recipes: the budget is ``--ratio`` / ``--keep`` of the experts."""

from __future__ import annotations

from dataclasses import dataclass

from moe_fx.errors import BadOptionError


@dataclass(frozen=True)
class Preset:
    """A preset's options in memory and the variant a streamed prune runs; ``measured`` / ``streamed_measured``:
    what chose them, printed when it runs."""

    options: dict
    streamed: dict
    measured: str
    streamed_measured: str


PRESETS: dict[str, Preset] = {
    "best-oneshot": Preset(
        {"method": "eep", "allocation": "global", "compensate": True},
        streamed={"method": "reap", "allocation": "uniform", "compensate": True},
        measured="EEP global + compensation: 0.73x / 0.59x REAP's loss at 25% / 50% on qwen3moe-bench",
        streamed_measured="REAP + compensation: 0.83x / 0.66x REAP's loss at 25% / 50% on qwen3moe-bench",
    ),
    "best": Preset(
        {"method": "eep", "allocation": "global", "compensate": True, "distill_steps": 200, "distill_lr": 3e-4},
        streamed={"method": "reap", "allocation": "uniform", "compensate": True, "distill_steps": 200, "distill_lr": 3e-4,
                  "distill_teacher": "cached"},
        measured="EEP global + compensation + 200 distillation steps: 0.37x REAP's loss at 25% on qwen3moe-bench",
        streamed_measured="REAP + compensation + 200 steps distilled from the cached top-64: 0.44x REAP's loss at 25% on qwen3moe-bench",
    ),
}

PRESET_OPTIONS = ("method", "allocation", "compensate", "merge", "distill_steps", "distill_lr", "granularity")
"""The options a preset decides; setting one of them beside ``--preset`` is refused rather than silently overridden."""


def preset_options(name: str, *, streamed: bool = False) -> dict:
    """The options preset ``name`` stands for (keys as ``moe-fx prune``'s argument names), for an in-memory or a
    streamed prune; a one-line error for an unknown name."""
    if name not in PRESETS:
        raise BadOptionError(f"--preset {name}: unknown preset; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[name]
    return dict(preset.streamed if streamed else preset.options)
