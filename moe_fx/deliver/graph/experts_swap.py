"""ExpertsPass: run each matched experts computation with the moe_fx experts implementation.

Whatever the model was compiled with (``grouped_mm``, ``batched_mm``), the experts region is replaced by the
moe_fx forward (:mod:`moe_fx.kernels`) on the same graph values, without touching the model's setting.
"""

from __future__ import annotations

from typing import ClassVar

from torch import fx

from moe_fx.deliver.graph.match import GraphMoEBlock
from moe_fx.deliver.graph.names import within
from moe_fx.deliver.graph.pass_base import GraphContext, MoEGraphPass
from moe_fx.deliver.graph.rewrite import replace_experts, with_tensors
from moe_fx.kernels.forward import moe_fx_experts_forward


class ExpertsPass(MoEGraphPass):
    """Swap matched ``grouped_mm``/``batched_mm`` experts computations for the moe_fx experts implementation."""

    name: ClassVar[str] = "experts"

    def rewrite(self, gm: fx.GraphModule, block: GraphMoEBlock, ctx: GraphContext) -> bool:
        if block.implementation not in ("grouped_mm", "batched_mm"):
            return False  # already moe_fx, or rewritten by another pass (instrumented)
        module = ctx.model.get_submodule(block.experts_path)
        names = [n for n in block.tensors if within(n.rsplit(".", 1)[0], block.experts_path)]
        run = with_tensors(ctx.model, names, lambda h, i, w: moe_fx_experts_forward(module, h, i, w))
        args = [block.tensors[n] for n in names] + [block.hidden, block.top_k_index, block.top_k_weights]
        replace_experts(gm, block, "moe_fx_experts", run, args)
        return True
