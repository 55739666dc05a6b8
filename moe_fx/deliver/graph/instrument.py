"""InstrumentPass: calibration statistics accumulated inside the compiled graph, with no Python hooks.

Each matched experts region is replaced by the instrumented call of the eager hooks
(:meth:`~moe_fx.calibrate.hooks.BlockProbe.observe`) on the graph's values: the experts' own forward
runs per (token, slot), the observers update their running sums, the routing weights combine the outputs. The
sums live in persistent tensors, registered on every graph as buffers, so AOTAutograd turns the updates into
in-place writes of the compiled code and the statistics equal the eager hooks'. Observers that sample tokens
(a host-side reservoir) or need a backward pass stay eager-only and are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import fx, nn

from moe_fx.calibrate.hooks import BlockProbe, check_routed, router_logits
from moe_fx.calibrate.observers import OBSERVERS, Observer
from moe_fx.deliver.graph.match import GraphMoEBlock
from moe_fx.deliver.graph.pass_base import GraphContext, MoEGraphPass
from moe_fx.deliver.graph.rewrite import attr_name, constant, replace_experts, with_tensors
from moe_fx.errors import BadOptionError
from moe_fx.model.spec import MoEModelSpec

GRAPH_OBSERVERS = ("routing", "reap", "channels")
"""Observers that run inside a compiled graph (running sums of routing, REAP saliency, channel activations)."""


class InstrumentPass(MoEGraphPass):
    """Accumulate the ``observers``' statistics of every matched block inside the graph; read them with :meth:`stats`."""

    name: ClassVar[str] = "instrument"

    def __init__(self, observers: Sequence[str | Observer] = ("routing", "reap")) -> None:
        names = [o if isinstance(o, str) else o.name for o in observers]
        bad = [n for n in names if n not in GRAPH_OBSERVERS]
        if bad:
            raise BadOptionError(f"observers {bad} cannot run inside a compiled graph (they sample tokens on the host or need "
                                 f"a backward pass; known observers: {sorted(OBSERVERS)}); compiled calibration supports {list(GRAPH_OBSERVERS)}")
        self.observers: list[Observer] = [OBSERVERS[o]() if isinstance(o, str) else o for o in observers]
        self.probes: dict[str, BlockProbe] = {}

    def check(self, model: nn.Module | None, spec: MoEModelSpec | None) -> None:
        super().check(model, spec)
        check_routed(spec)

    def probe(self, model: nn.Module, block: GraphMoEBlock) -> BlockProbe:
        """The block's probe, made once: every graph of the model (recompiles) adds to the same sums."""
        owner = next(iter(self.probes.values())).model if self.probes else model
        if owner is not model:
            raise BadOptionError("this InstrumentPass already holds another model's statistics: use one InstrumentPass per model")
        if block.path not in self.probes:
            self.probes[block.path] = BlockProbe(model, block.spec, self.observers)
        return self.probes[block.path]

    def rewrite(self, gm: fx.GraphModule, block: GraphMoEBlock, ctx: GraphContext) -> bool:
        model, probe = ctx.model, self.probe(ctx.model, block)
        module = model.get_submodule(block.experts_path)
        keys = list(probe.acc)
        accs = [constant(gm, attr_name(block, k), probe.acc[k], before=block.region[0]) for k in keys]
        names = list(block.tensors)

        def observed(router_input: torch.Tensor, hidden: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, *acc: torch.Tensor) -> torch.Tensor:
            logits = router_logits(model, block.spec, router_input) if probe.needs_logits else None
            return probe.observe(dict(zip(keys, acc)), module.forward, hidden, idx, w, logits, lambda: module.forward(hidden, idx, w))

        args = [block.tensors[n] for n in names] + [block.router_input, block.hidden, block.top_k_index, block.top_k_weights] + accs
        replace_experts(gm, block, "instrumented_experts", with_tensors(model, names, observed), args)
        return True

    def stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per block path, the accumulated statistics (on the CPU), named as the eager observers name them."""
        return {path: {k: v.detach().cpu().clone() for k, v in probe.acc.items()} for path, probe in self.probes.items()}

    def reset(self) -> None:
        """Zero the sums in place (the compiled graphs keep writing to the same tensors)."""
        for probe in self.probes.values():
            for v in probe.acc.values():
                v.zero_()

    def accumulators(self) -> dict[str, dict[str, torch.Tensor]]:
        """The live accumulators (on the model's devices), which the compiled graphs update in place."""
        return {path: probe.acc for path, probe in self.probes.items()}
