"""Old import paths, from before the package was laid out by stage (0.1.x), kept working.

``import moe_fx`` installs :class:`MovedModuleFinder`, which resolves each old dotted name to the module that
holds its code now (the same module object, so ``isinstance`` checks and monkeypatching agree) and warns once
with a :class:`DeprecationWarning` naming the new path. CHANGELOG.md lists the moves. Two old names now name a
different stage and are not aliased: ``moe_fx.rewrite`` (tensor helpers: :mod:`moe_fx.model.tensors`) and the
module ``moe_fx.plan`` (still importable: the package re-exports ``PrunePlan`` and ``ChannelPlan``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED: dict[str, str] = {
    "moe_fx.adapters": "moe_fx.model.adapters",
    "moe_fx.compiling": "moe_fx.deliver.compile",
    "moe_fx.data": "moe_fx.calibrate.data",
    "moe_fx.distributed": "moe_fx.calibrate.distributed",
    "moe_fx.expert_math": "moe_fx.model.expert_math",
    "moe_fx.expert_weights": "moe_fx.model.expert_weights",
    "moe_fx.experts_implementation": "moe_fx.kernels.implementation",
    "moe_fx.exporters": "moe_fx.formats",
    "moe_fx.exporters.atomic": "moe_fx.formats.atomic",
    "moe_fx.exporters.checkpoint": "moe_fx.formats.checkpoint",
    "moe_fx.exporters.onnx": "moe_fx.deliver.onnx.export",
    "moe_fx.exporters.onnx_runtime": "moe_fx.deliver.onnx.runtime",
    "moe_fx.exporters.partial": "moe_fx.formats.partial",
    "moe_fx.exporters.per_layer_model": "moe_fx.model.per_layer",
    "moe_fx.families": "moe_fx.model.families",
    "moe_fx.fx_check": "moe_fx.model.fx_check",
    "moe_fx.graph": "moe_fx.deliver.graph",
    "moe_fx.graph.backend": "moe_fx.deliver.graph.backend",
    "moe_fx.graph.experts_swap": "moe_fx.deliver.graph.experts_swap",
    "moe_fx.graph.instrument": "moe_fx.deliver.graph.instrument",
    "moe_fx.graph.match": "moe_fx.deliver.graph.match",
    "moe_fx.graph.names": "moe_fx.deliver.graph.names",
    "moe_fx.graph.pass_base": "moe_fx.deliver.graph.pass_base",
    "moe_fx.graph.rewrite": "moe_fx.deliver.graph.rewrite",
    "moe_fx.graph.virtual_prune": "moe_fx.deliver.graph.virtual_prune",
    "moe_fx.layer_calls": "moe_fx.model.layers",
    "moe_fx.layout": "moe_fx.model.layout",
    "moe_fx.lazy_checkpoint": "moe_fx.formats.lazy",
    "moe_fx.loading": "moe_fx.formats.loading",
    "moe_fx.moe_experts": "moe_fx.kernels",
    "moe_fx.moe_experts.distinct_forward": "moe_fx.kernels.distinct_forward",
    "moe_fx.moe_experts.forward": "moe_fx.kernels.forward",
    "moe_fx.moe_experts.grouped_mm": "moe_fx.kernels.grouped_mm",
    "moe_fx.moe_experts.layout": "moe_fx.kernels.experts_module",
    "moe_fx.moe_experts.routed_gemv": "moe_fx.kernels.routed_gemv",
    "moe_fx.moe_experts.triton_kernels": "moe_fx.kernels.triton_kernels",
    "moe_fx.passes.allocate": "moe_fx.plan.allocate",
    "moe_fx.passes.calibrate": "moe_fx.calibrate",
    "moe_fx.passes.calibrate.hooks": "moe_fx.calibrate.hooks",
    "moe_fx.passes.calibrate.observers": "moe_fx.calibrate.observers",
    "moe_fx.passes.channel_allocate": "moe_fx.plan.channel_allocate",
    "moe_fx.passes.compensate": "moe_fx.rewrite.compensate",
    "moe_fx.passes.distill": "moe_fx.rewrite.distill",
    "moe_fx.passes.drop_experts": "moe_fx.rewrite.drop_experts",
    "moe_fx.passes.eep": "moe_fx.plan.eep",
    "moe_fx.passes.merge_experts": "moe_fx.rewrite.merge_experts",
    "moe_fx.passes.prune_channels": "moe_fx.rewrite.prune_channels",
    "moe_fx.passes.score": "moe_fx.score.score_pass",
    "moe_fx.passes.scorers": "moe_fx.score",
    "moe_fx.passes.scorers.channel": "moe_fx.score.channel",
    "moe_fx.passes.scorers.frequency": "moe_fx.score.frequency",
    "moe_fx.passes.scorers.naee": "moe_fx.score.naee",
    "moe_fx.passes.scorers.random": "moe_fx.score.random",
    "moe_fx.passes.scorers.reap": "moe_fx.score.reap",
    "moe_fx.passes.scorers.sample": "moe_fx.score.sample",
    "moe_fx.passes.scorers.shape": "moe_fx.score.shape",
    "moe_fx.recipe": "moe_fx.run.recipe",
    "moe_fx.report": "moe_fx.evaluate.report",
    "moe_fx.report.plots": "moe_fx.evaluate.report.plots",
    "moe_fx.report.report": "moe_fx.evaluate.report.report",
    "moe_fx.report.sweep_report": "moe_fx.evaluate.report.sweep_report",
    "moe_fx.routing": "moe_fx.model.routing",
    "moe_fx.spec": "moe_fx.model.spec",
    "moe_fx.stats": "moe_fx.calibrate.stats",
    "moe_fx.streaming": "moe_fx.run.streaming",
    "moe_fx.sweep": "moe_fx.run.sweep",
    "moe_fx.table": "moe_fx.evaluate.table",
    "moe_fx.trace": "moe_fx.model.trace",
    "moe_fx.zero_shot": "moe_fx.evaluate.zero_shot",
    "moe_fx.zero_shot.cache": "moe_fx.evaluate.zero_shot.cache",
    "moe_fx.zero_shot.evaluate": "moe_fx.evaluate.zero_shot.evaluate",
    "moe_fx.zero_shot.loglik": "moe_fx.evaluate.zero_shot.loglik",
    "moe_fx.zero_shot.tasks": "moe_fx.evaluate.zero_shot.tasks",
}
"""Old module name -> the module that holds its code now."""


class _AliasLoader(importlib.abc.Loader):
    """Hands back the already imported new module instead of executing anything."""

    def __init__(self, module) -> None:
        self.module = module
        self.spec = module.__spec__

    def create_module(self, spec):
        return self.module

    def exec_module(self, module) -> None:
        module.__spec__ = self.spec  # the import system set the alias's spec: the module keeps its own


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds an old module name of :data:`MOVED` by importing its new home."""

    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        warnings.warn(f"{fullname} moved to {new}; import it from there (the old path will be removed)", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        return importlib.util.spec_from_loader(fullname, _AliasLoader(module))


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
