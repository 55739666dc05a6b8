"""Several methods x ratios on one model: calibrate once, then per point score, rewrite a copy, evaluate.

Every point is the prune ``moe-fx prune --method M --ratio R`` would run (same passes, from
:mod:`moe_fx.run.recipe`), on statistics from one calibration over the union of what the methods read, so
the comparison is paired: same calibration tokens, same evaluation windows and task items.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from moe_fx.errors import BadOptionError, MoeFxError, first_line
from moe_fx.evaluate.nll import EvalSet, evaluate_nll, model_size
from moe_fx.passes import Calibrate
from moe_fx.pipeline import compose, state_of
from moe_fx.run.recipe import observers_for, parse_method, prune_passes
from moe_fx.score import Scorer, get_scorer

ZeroShot = Callable[[nn.Module], dict]
"""Model -> zero-shot results (:func:`moe_fx.evaluate.zero_shot.evaluate_tasks` with the caller's tasks and cache)."""


@dataclass
class SweepResult:
    base: dict
    """``nll`` (per domain), ``tasks``, ``size`` of the unpruned model."""
    points: list[dict] = field(default_factory=list)
    """Per (method, ratio): ``method``, ``ratio``, ``nll_mean``, ``nll_delta``, ``worst_delta``, ``worst_domain``,
    ``domains`` (delta per domain), ``tasks`` (results), ``task_deltas`` (accuracy change), ``size``, ``seconds``."""
    calibration: dict | None = None


def _point(method: str, ratio: float, base: dict, nll: dict | None, tasks: dict | None, size: dict, seconds: float) -> dict:
    point = {"method": method, "ratio": ratio, "size": size, "seconds": round(seconds, 3), "tasks": tasks}
    if nll is not None:
        deltas = {d: nll[d]["nll"] - base["nll"][d]["nll"] for d in nll if d not in ("mean", "all")}
        worst = max(deltas, key=deltas.get)
        point |= {"nll_mean": nll["mean"]["nll"], "nll_delta": nll["mean"]["nll"] - base["nll"]["mean"]["nll"],
                  "worst_delta": deltas[worst], "worst_domain": worst, "domains": deltas}
    if tasks is not None:
        point["task_deltas"] = {t: tasks[t]["acc"] - base["tasks"][t]["acc"] for t in tasks}
    return point


def sweep_scorers(methods: Sequence[str], *, seed: int = 0) -> dict[str, Scorer]:
    """Method label -> its scorer; unknown names and searches (which need their own fitness split) are errors."""
    names = {m: parse_method(m)[0] for m in methods}
    if "eep" in names.values():
        raise BadOptionError("eep searches with its own fitness split; run it with moe-fx prune --method eep, not in a sweep")
    return {m: get_scorer(name, seed=seed) for m, name in names.items()}


def needs_calibration(methods: Sequence[str], *, compensate: bool = False, seed: int = 0) -> bool:
    """Whether any point of the sweep reads calibration statistics (a scorer's, merging's or compensation's)."""
    scorers = sweep_scorers(methods, seed=seed)
    return any(s.needs for s in scorers.values()) or any(parse_method(m)[1] for m in methods) or compensate


def run_sweep(
    model: nn.Module,
    *,
    methods: Sequence[str],
    ratios: Sequence[float],
    calibration: Calibrate | None,
    eval_set: EvalSet | None,
    zero_shot: ZeroShot | None = None,
    compensate: bool = False,
    allocation: str = "uniform",
    seed: int = 0,
    batch_size: int = 8,
    show_progress: bool = True,
    on_point: Callable[[dict, nn.Module | None], None] | None = None,
) -> SweepResult:
    """Prune ``model`` (left unpruned) at every method x ratio; ``on_point(point, pruned)`` sees each result
    (to save the checkpoint, say). ``calibration``'s observers are replaced by the union the methods need. A
    point whose passes fail with a :class:`MoeFxError` is recorded with its ``error`` (``pruned`` None) and
    the sweep goes on."""
    if not methods or not ratios:
        raise BadOptionError("a sweep needs at least one method and one ratio")
    if eval_set is None and zero_shot is None:
        raise BadOptionError("a sweep needs something to measure: evaluation text and/or zero-shot tasks")
    parsed = [(m, *parse_method(m)) for m in methods]
    scorers = sweep_scorers(methods, seed=seed)
    merge = next((mg for _, _, mg in parsed if mg), None)  # any merging method's grouping: its observers
    needs_data = needs_calibration(methods, compensate=compensate, seed=seed)
    if needs_data and calibration is None:
        raise BadOptionError(f"methods {', '.join(methods)} need calibration data")
    spec = state_of(model).spec

    def measure(m: nn.Module) -> tuple[dict | None, dict | None]:
        nll = evaluate_nll(m, eval_set, batch_size=batch_size, show_progress=show_progress) if eval_set else None
        return nll, zero_shot(m) if zero_shot else None

    nll, tasks = measure(model)
    result = SweepResult(base={"nll": nll, "tasks": tasks, "size": model_size(model)})
    if needs_data:
        calibration = copy.copy(calibration)
        calibration.observers = observers_for(scorers.values(), merge=merge, compensate=compensate)
        model = compose(calibration)(model)
        result.calibration = state_of(model).stats.summary()
    for label, _name, merge_it in parsed:
        for ratio in ratios:
            t0 = time.perf_counter()
            try:
                pruned = compose(*prune_passes(scorers[label], spec, ratio=ratio, merge=merge_it, compensate=compensate,
                                               allocation=allocation, seed=seed))(copy.deepcopy(model))
            except MoeFxError as exc:  # one method that cannot run here does not cost the other points
                result.points.append({"method": label + ("+comp" if compensate else ""), "ratio": ratio, "error": first_line(exc)})
                if on_point is not None:
                    on_point(result.points[-1], None)
                continue
            seconds = time.perf_counter() - t0
            nll, tasks = measure(pruned)
            point = _point(label + ("+comp" if compensate else ""), ratio, result.base, nll, tasks, model_size(pruned), seconds)
            result.points.append(point)
            if on_point is not None:
                on_point(point, pruned)
            del pruned
    return result


def sweep_label(point: dict) -> str:
    """Directory-safe name of a point: ``reap-25``."""
    return f"{point['method'].replace('+', '-')}-{round(100 * point['ratio']):g}"


def point_dir(out: Path, point: dict) -> Path:
    return out / "checkpoints" / sweep_label(point)
