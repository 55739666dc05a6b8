"""The base of moe-fx's graph passes: torch.fx ``PassBase`` objects that rewrite each matched MoE block.

A pass is configured once (a plan, observers) and may run on many graphs: Dynamo hands the backend a new graph
on every recompile (another batch shape, a graph break). A pass matches the graph again after another pass changed
it (:func:`~moe_fx.deliver.graph.match.match_moe_blocks`), so passes compose in any order: a rewritten experts region keeps
the module stack that the matcher reads. What a pass needs from the model (its modules, its canonical spec) comes
from the :class:`GraphContext` the backend attaches to the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from moe_fx.deliver.graph.match import GraphMoEBlock, MatchReport, match_moe_blocks
from moe_fx.errors import BadOptionError
from moe_fx.model.spec import MoEModelSpec

CONTEXT_KEY = "moe_fx"


@dataclass
class GraphContext:
    """What the backend knows beside the graph: the compiled model (None when only a graph is given) and its spec."""

    model: nn.Module | None = None
    spec: MoEModelSpec | None = None
    match: MatchReport | None = None
    """The matches of the graph as it is now (None once a pass has changed it: the next pass matches again)."""
    reports: list[dict] = field(default_factory=list)
    """Per pass run: the pass name and the blocks it rewrote."""


def graph_context(gm: fx.GraphModule) -> GraphContext:
    return gm.meta.setdefault(CONTEXT_KEY, GraphContext())


class MoEGraphPass(PassBase):
    """Rewrites every matched block of a graph with :meth:`rewrite`, reading the model's modules and spec."""

    name: ClassVar[str] = "moe_graph_pass"

    def check(self, model: nn.Module | None, spec: MoEModelSpec | None) -> None:
        """Raise :class:`BadOptionError` before any compile when this pass cannot run for ``model``."""
        if model is None:
            raise BadOptionError(f"the {self.name} graph pass reads the model's modules: build the backend with "
                                 "moe_fx.backend(passes=[...], model=model) (or use moe_fx.deliver.graph.compiled(model, passes))")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        ctx = graph_context(graph_module)
        self.check(ctx.model, ctx.spec)
        report = ctx.match or match_moe_blocks(graph_module, ctx.spec)
        rewritten = [b.path for b in report.blocks if self.rewrite(graph_module, b, ctx)]
        ctx.match = None if rewritten else report
        ctx.reports.append({"pass": self.name, "rewritten": rewritten, "unmatched": [vars(u) for u in report.unmatched]})
        if rewritten:
            graph_module.graph.lint()
            graph_module.recompile()
        return PassResult(graph_module, bool(rewritten))

    def rewrite(self, gm: fx.GraphModule, block: GraphMoEBlock, ctx: GraphContext) -> bool:
        """Rewrite one block; return whether the graph changed."""
        raise NotImplementedError
