"""Passes and their composition, in the shape of torch.fx's pass infrastructure.

A pass is a small config object (a dataclass) with ``requires`` (check that what it needs exists) and
``run`` (do the work, return a :class:`PassResult`). Passes communicate through a :class:`MoEState`
attached to the model (spec, calibration statistics, scores, plan, history), so a build script can
compose them: ``model = compose(Calibrate(data), Score("reap"), DropExperts(ratio=0.25))(model)``.
A failing pass is re-raised naming the pass and the passes already run.
"""

from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from moe_fx.errors import BadOptionError, MoeFxError, PassOrderError
from moe_fx.model.spec import MoEBlockSpec, MoEModelSpec

STATE_ATTR = "moe_fx_state"


@dataclass
class PassRecord:
    """What one pass did: its config, how long it took, and its report."""

    name: str
    config: dict
    seconds: float
    modified: bool
    report: dict


@dataclass
class MoEState:
    """What passes share about one model. ``stats``/``scores``/``plan`` are filled by the passes."""

    spec: MoEModelSpec
    original_spec: MoEModelSpec
    stats: Any = None
    scores: Any = None
    plan: Any = None
    teacher_cache: Any = None
    """The unpruned model's cached top-k distributions (:class:`~moe_fx.rewrite.teacher_cache.CacheTeacher`), read by
    ``Distill(teacher="cached")``."""
    search: Any = None
    """The last plan search's result (``EvolutionarySearch``), with its fitness history."""
    channel_plan: Any = None
    """The last :class:`~moe_fx.plan.ChannelPlan` applied (channel ids of the experts it saw)."""
    masked: bool = False
    """Channels were zeroed in place (``PruneChannels(mask_only=True)``, a debug mode): never saved."""
    substituted: bool = False
    """Experts were replaced by constants held beside a smaller experts module
    (:class:`~moe_fx.passes.SubstituteExperts`): the router routes to more experts than the module holds, which no
    other pass rewrites, so none may run after it."""
    layout_deferred: bool = False
    """Rewrites leave ``model.config`` alone: a streaming run (:mod:`moe_fx.run.streaming`) rewrites one layer at a
    time and makes the config describe all layers once they are all done."""
    history: list[PassRecord] = field(default_factory=list)

    def recorded_positions(self, block: MoEBlockSpec, recorded: int) -> torch.Tensor | None:
        """Positions of ``block``'s current experts among the ``recorded`` experts a calibration statistic
        covers: None when none was dropped since calibration, the plan's kept ids when it was recorded on the
        original experts. Anything else cannot be mapped and is an error naming the fix."""
        if recorded == block.num_experts:
            return None
        original = next((b.num_experts for b in self.original_spec.blocks if b.path == block.path), None)
        kept = self.plan.kept_experts.get(block.path) if self.plan is not None else None
        if recorded == original and kept is not None and len(kept) == block.num_experts:
            return torch.tensor(kept, dtype=torch.long)
        raise BadOptionError(
            f"{block.path}: calibration statistics cover {recorded} experts, the block has {block.num_experts} and the "
            "plan does not map them; run Calibrate on the unpruned model, or again after the passes that changed the experts"
        )

    def report_of(self, name: str, *, modified_only: bool = False) -> dict | None:
        """The report of the last run of the pass called ``name`` (None if it did not run, or with
        ``modified_only`` if it changed nothing): summaries read reports by name, never by position."""
        return next((r.report for r in reversed(self.history) if r.name == name and (r.modified or not modified_only)), None)

    def record(self) -> dict:
        """JSON-serialisable summary (written to ``moe_fx.json``)."""
        return {
            "model_type": self.spec.model_type,
            "family": self.spec.family,
            "passes": [dataclasses.asdict(r) for r in self.history],
            "plan": self.plan.to_dict() if self.plan is not None else None,
            "scores": self.scores.to_dict() if self.scores is not None else None,
            "calibration": self.stats.summary() if self.stats is not None else None,
            "search": self.search.to_dict() if self.search is not None else None,
            "channel_plan": self.channel_plan.to_dict() if self.channel_plan is not None else None,
            "experts_before": {b.path: b.num_experts for b in self.original_spec.blocks},
            "experts_after": {b.path: b.num_experts for b in self.spec.blocks},
            "widths_before": {b.path: b.experts.intermediate_size for b in self.original_spec.blocks},
            "widths_after": {b.path: b.experts.intermediate_size for b in self.spec.blocks},
        }


def state_of(model: nn.Module) -> MoEState:
    """The model's :class:`MoEState`, created by tracing the model on first use."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        from moe_fx.model.trace import trace

        spec = trace(model)
        state = MoEState(spec=spec, original_spec=spec)
        # object.__setattr__: a plain attribute, not registered as a submodule or saved with weights
        object.__setattr__(model, STATE_ATTR, state)
    return state


@dataclass
class PassResult:
    model: nn.Module
    modified: bool
    report: dict = field(default_factory=dict)


class Pass(ABC):
    """Base of all moe-fx passes. Subclasses are dataclasses whose fields are the pass's config."""

    name: ClassVar[str] = "pass"

    def requires(self, state: MoEState) -> None:
        """Raise :class:`PassOrderError` if an earlier pass has not produced what this one needs."""

    def check_model(self, model: nn.Module, spec: MoEModelSpec) -> None:
        """Refuse what this pass cannot do on ``model`` whatever the data: its family's experts or routing, given the
        pass's options. A :class:`Pipeline` checks every pass before it runs the first, so an unsupported
        combination fails before calibration; checks read module attributes only, so they also run on a model
        built on the meta device before its weights are loaded (what ``moe-fx prune`` does)."""

    @abstractmethod
    def run(self, model: nn.Module, state: MoEState) -> PassResult: ...

    def check_layerwise(self) -> None:
        """Raise :class:`BadOptionError` unless this pass can run on one decoder layer at a time (a streaming run,
        :mod:`moe_fx.run.streaming`): it must read and change only the blocks of the state's spec."""
        raise BadOptionError(f"{self.name} needs the whole model at once and cannot run layer by layer (streaming); run it in memory")

    def config_dict(self) -> dict:
        """The pass's options as JSON-friendly values (data objects are summarised, not dumped)."""
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            out[f.name] = v if isinstance(v, (int, float, str, bool, type(None))) else _describe(v)
        return out

    def __call__(self, model: nn.Module) -> nn.Module:
        return compose(self)(model)


def _describe(value: Any) -> Any:
    if isinstance(value, (list, tuple)) and len(value) <= 16 and all(isinstance(v, (int, float, str)) for v in value):
        return list(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return f"{len(value)} strings"
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return type(value).__name__ if not isinstance(value, (list, tuple, dict)) else repr(value)[:200]


def require(condition: bool, pass_name: str, what: str, producer: str) -> None:
    if not condition:
        raise PassOrderError(f"{pass_name} needs {what}: run {producer} before it in the pipeline")


class Pipeline:
    """An ordered list of passes run on one model; failures name the pass and those already run."""

    def __init__(self, *passes: Pass, check=None) -> None:
        for p in passes:
            if not isinstance(p, Pass):
                raise TypeError(f"compose() takes moe_fx passes, got {type(p).__name__}: wrap it in a Pass subclass")
        self.passes = passes
        self.check = check

    def check_model(self, model: nn.Module) -> None:
        """Every pass's :meth:`Pass.check_model` on ``model`` (weights need not be loaded), before any work."""
        spec = state_of(model).spec
        for p in self.passes:
            p.check_model(model, spec)

    def __call__(self, model: nn.Module) -> nn.Module:
        state = state_of(model)
        self.check_model(model)
        done: list[str] = []
        for p in self.passes:
            t0 = time.perf_counter()
            try:
                if state.substituted:
                    raise PassOrderError(f"{p.name} cannot run after substitute_experts: the substituted blocks' routers route to "
                                         "constants beside their experts, which no other pass rewrites; substitute experts last")
                p.requires(state)
                result = p.run(model, state)
                if self.check is not None:
                    self.check(result.model)
            except MoeFxError:
                raise
            except Exception as exc:
                raise RuntimeError(f"pass {p.name} failed (passes already run: {done or 'none'}): {exc}") from exc
            model = result.model
            state.history.append(PassRecord(p.name, p.config_dict(), time.perf_counter() - t0, result.modified, result.report))
            done.append(p.name)
        return model


def compose(*passes: Pass, check=None) -> Pipeline:
    """Compose passes into a :class:`Pipeline` (call it on a model)."""
    return Pipeline(*passes, check=check)
