"""moe-fx as a torch.compile backend: MoE graph passes on the FX graph Dynamo captures.

``match``: find the MoE blocks of a captured graph; ``instrument``: calibration statistics inside the compiled
graph; ``virtual_prune``: a prune plan applied inside the graph; ``experts_swap``: the moe_fx experts
implementation in place of the captured one; ``backend``: the Dynamo backend that runs them before Inductor.
"""

from moe_fx.deliver.graph.backend import MoEBackend, backend, compiled, moe_fx_backend, register
from moe_fx.deliver.graph.experts_swap import ExpertsPass
from moe_fx.deliver.graph.instrument import GRAPH_OBSERVERS, InstrumentPass
from moe_fx.deliver.graph.match import GraphMoEBlock, MatchReport, Unmatched, match_moe_blocks
from moe_fx.deliver.graph.pass_base import GraphContext, MoEGraphPass
from moe_fx.deliver.graph.virtual_prune import VirtualPrunePass

register()

__all__ = [
    "GRAPH_OBSERVERS",
    "ExpertsPass",
    "GraphContext",
    "GraphMoEBlock",
    "InstrumentPass",
    "MatchReport",
    "MoEBackend",
    "MoEGraphPass",
    "Unmatched",
    "VirtualPrunePass",
    "backend",
    "compiled",
    "match_moe_blocks",
    "moe_fx_backend",
    "register",
]
