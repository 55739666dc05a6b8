"""The moe-fx torch.compile backend: MoE graph passes on the graph Dynamo captures, then another backend.

``torch.compile(model, backend=moe_fx.backend(passes=[...], model=model, inner="inductor"))``: Dynamo hands
each captured FX graph to :class:`MoEBackend`, which matches its MoE blocks, runs the passes through torch.fx's
``PassManager`` and hands the result to ``inner`` (a registered backend name, or any backend callable, another
:class:`MoEBackend` included). ``torch.compile(model, backend="moe_fx")`` (registered with Dynamo, also as a
``torch_dynamo_backends`` entry point) matches and reports, with no passes, then runs Inductor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_manager import PassManager

from moe_fx.deliver.graph.match import MatchReport, match_moe_blocks
from moe_fx.deliver.graph.pass_base import CONTEXT_KEY, GraphContext, MoEGraphPass
from moe_fx.errors import BadOptionError, UnsupportedFamilyError
from moe_fx.model.spec import MoEModelSpec

log = logging.getLogger(__name__)

Backend = Callable[[fx.GraphModule, list[Any]], Callable[..., Any]]


class MoEBackend:
    """A Dynamo backend running MoE graph ``passes`` before ``inner``.

    ``model``: the module being compiled, which passes that read modules or the canonical spec need (its spec
    is traced once, here). ``strict``: raise when a graph holds a block that is not matched (else reported in
    :meth:`report` and logged). ``options``: Inductor config patches when ``inner`` is ``"inductor"``
    (``{"triton.cudagraphs": True}`` replays each graph as a CUDA graph: what ``mode="reduce-overhead"`` does
    for the stock backend, which ``torch.compile`` accepts for ``backend="inductor"`` only)."""

    def __init__(self, passes: Sequence[MoEGraphPass] = (), inner: str | Backend = "inductor", *, model: nn.Module | None = None,
                 strict: bool = False, options: dict[str, Any] | None = None) -> None:
        self.passes = list(passes)
        self.inner = inner
        self.options = dict(options or {})
        if self.options and inner != "inductor":
            raise BadOptionError(f"options are Inductor config patches and need inner='inductor', not {inner!r}")
        self.model = model
        self.strict = strict
        self.spec: MoEModelSpec | None = None
        if model is not None:
            from moe_fx.pipeline import state_of

            self.spec = state_of(model).spec
        for p in self.passes:
            if not isinstance(p, MoEGraphPass):
                raise BadOptionError(f"moe_fx.backend passes must be moe-fx graph passes, got {type(p).__name__}")
            p.check(model, self.spec)
        if not (callable(inner) or isinstance(inner, str)):
            raise BadOptionError(f"inner must be a backend name or a backend callable, got {type(inner).__name__}")
        self.reports: list[MatchReport] = []
        self.pass_reports: list[dict] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        report = match_moe_blocks(gm, self.spec)
        ctx = GraphContext(self.model, self.spec, match=report)
        gm.meta[CONTEXT_KEY] = ctx
        self.reports.append(report)
        for u in report.unmatched:
            log.warning("moe_fx backend: %s not matched: %s", u.path, u.reason)
        if self.strict and report.unmatched:
            u = report.unmatched[0]
            raise UnsupportedFamilyError(f"moe_fx backend (strict): {len(report.unmatched)} block(s) not matched, first {u.path}: {u.reason}")
        if self.passes:
            gm = PassManager(list(self.passes))(gm).graph_module
            self.pass_reports.extend(ctx.reports)
        if self.options:
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs, config_patches=self.options)
        return self._inner()(gm, example_inputs)

    def _inner(self) -> Backend:
        if callable(self.inner):
            return self.inner
        from torch._dynamo import lookup_backend

        return lookup_backend(self.inner)

    def report(self) -> dict:
        """Over every graph compiled so far: the blocks matched, those not matched (with the reason) and, with a
        model, the spec's blocks that no graph held."""
        matched = {b.path: b.describe() for r in self.reports for b in r.blocks}
        unmatched = {u.path: u.reason for r in self.reports for u in r.unmatched}
        absent = [p for p in dict.fromkeys(p for r in self.reports for p in r.absent) if p not in matched and p not in unmatched]
        return {"graphs": len(self.reports), "matched": list(matched.values()),
                "unmatched": [{"path": p, "reason": r} for p, r in unmatched.items()], "absent": absent,
                "passes": self.pass_reports}


def backend(passes: Sequence[MoEGraphPass] = (), inner: str | Backend = "inductor", *, model: nn.Module | None = None,
            strict: bool = False, options: dict[str, Any] | None = None) -> MoEBackend:
    """A configured moe-fx backend for ``torch.compile(..., backend=...)``; see :class:`MoEBackend`."""
    return MoEBackend(passes, inner, model=model, strict=strict, options=options)


def moe_fx_backend(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
    """The backend registered as ``"moe_fx"``: match and report MoE blocks (no passes), then Inductor."""
    return MoEBackend()(gm, example_inputs)


def register() -> None:
    """Register :func:`moe_fx_backend` with Dynamo under ``"moe_fx"`` (once; the entry point may have done it)."""
    from torch._dynamo.backends.registry import list_backends, register_backend

    if "moe_fx" not in list_backends(exclude_tags=()):
        register_backend(moe_fx_backend, name="moe_fx")


def compiled(model: nn.Module, passes: Sequence[MoEGraphPass], *, inner: str | Backend = "inductor", options: dict[str, Any] | None = None,
             **compile_kwargs: Any) -> tuple[nn.Module, MoEBackend]:
    """``torch.compile(model, backend=MoEBackend(passes, inner, model=model, options=options), fullgraph=True)`` and
    the backend."""
    be = MoEBackend(passes, inner, model=model, options=options)
    return torch.compile(model, backend=be, **{"fullgraph": True, **compile_kwargs}), be
