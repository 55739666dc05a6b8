"""moe-fx: make Mixture-of-Experts language models smaller and faster.

Trace each MoE block into one canonical spec, calibrate, score experts, rewrite the model, and save a
checkpoint that stock transformers loads. Passes compose::

    from moe_fx import compose
    from moe_fx.passes import Calibrate, Score, DropExperts
    model = compose(Calibrate(texts), Score("reap"), DropExperts(ratio=0.25))(model)

The package is laid out by the stage of the data flow each folder serves, lower stages first:
``kernels`` (the experts implementation), ``model`` (spec, discovery, routing), ``calibrate``, ``score``,
``plan``, ``rewrite``, ``formats`` (save, load, stream), ``evaluate``, ``deliver`` (compile, graph backend,
ONNX), ``run`` (recipes, streaming, sweeps) and ``cli``. This module and :mod:`moe_fx.passes` are the public API.
"""

__version__ = "0.1.0"

from moe_fx import _moved
from moe_fx.deliver.compile import compile_model as compile
from moe_fx.deliver.static_cache import static_cache
from moe_fx.errors import MoeFxError
from moe_fx.formats.loading import load_model as load
from moe_fx.model.spec import ExpertsSpec, MoEBlockSpec, MoEModelSpec, RouterSpec, SharedExpertSpec
from moe_fx.model.trace import trace
from moe_fx.pipeline import MoEState, Pass, PassResult, Pipeline, compose, state_of
from moe_fx.plan.plans import PrunePlan

_moved.install()  # old import paths (moe_fx.formats.loading, moe_fx.deliver.onnx.export, ...) keep working, with a warning


def __getattr__(name: str):
    """``moe_fx.backend`` / ``moe_fx.deliver.graph``: the torch.compile backend, imported on first use (it imports Dynamo)."""
    if name in ("backend", "graph"):
        import importlib

        graph = importlib.import_module("moe_fx.deliver.graph")
        return graph if name == "graph" else graph.backend
    raise AttributeError(f"module 'moe_fx' has no attribute {name!r}")


__all__ = [
    "ExpertsSpec",
    "MoEBlockSpec",
    "MoEModelSpec",
    "MoEState",
    "MoeFxError",
    "Pass",
    "PassResult",
    "Pipeline",
    "PrunePlan",
    "RouterSpec",
    "SharedExpertSpec",
    "__version__",
    "backend",
    "compile",
    "compose",
    "load",
    "state_of",
    "static_cache",
    "trace",
]
