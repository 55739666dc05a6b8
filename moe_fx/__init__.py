"""moe-fx: make Mixture-of-Experts language models smaller and faster.

Trace each MoE block into one canonical spec, calibrate, score experts, rewrite the model, and save a
checkpoint that stock transformers loads. Passes compose::

    from moe_fx import compose
    from moe_fx.passes import Calibrate, Score, DropExperts
    model = compose(Calibrate(texts), Score("reap"), DropExperts(ratio=0.25))(model)
"""

__version__ = "0.1.0"

from .compiling import compile_model as compile
from .errors import MoeFxError
from .loading import load_model as load
from .pipeline import MoEState, Pass, PassResult, Pipeline, compose, state_of
from .plan import PrunePlan
from .spec import ExpertsSpec, MoEBlockSpec, MoEModelSpec, RouterSpec, SharedExpertSpec
from .trace import trace


def __getattr__(name: str):
    """``moe_fx.backend`` / ``moe_fx.graph``: the torch.compile backend, imported on first use (it imports Dynamo)."""
    if name in ("backend", "graph"):
        import importlib

        graph = importlib.import_module(f"{__name__}.graph")  # not `from . import graph`: that asks this hook again
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
    "trace",
]
