"""``moe_fx.compile``: torch.compile a (pruned) MoE model in one piece, without graph breaks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moe_fx.errors import BadOptionError, NotMoEError
from moe_fx.kernels.implementation import DEFAULT_IMPLEMENTATION, current, set_implementation
from moe_fx.kernels.prescaled import restore_prescaled_blocks, route_prescaled_blocks
from moe_fx.pipeline import state_of


def compile_model(model: nn.Module, *, experts_implementation: str | None = None, fullgraph: bool = True, **compile_kwargs: Any) -> nn.Module:
    """Switch the routed experts to an implementation that compiles whole, then ``torch.compile`` the model.

    The default (:data:`~moe_fx.kernels.implementation.DEFAULT_IMPLEMENTATION`) compiles with ``fullgraph=True``
    on CPU and CUDA; ``eager`` experts loop over the experts hit, a data-dependent graph break, so it is
    refused with ``fullgraph``. With the default, blocks whose experts transformers runs densely on prescaled
    inputs (Llama 4) run only their routed experts (:mod:`moe_fx.kernels.prescaled`); any other implementation
    keeps transformers' dense call there. The module is changed in place (its experts implementation, those
    blocks' forward) and the compiled wrapper returned; extra keyword arguments (``mode``, ``dynamic``,
    ``backend``) go to ``torch.compile``.
    """
    name = experts_implementation or DEFAULT_IMPLEMENTATION
    if name == "eager" and fullgraph:
        raise BadOptionError("eager experts loop over the experts hit in Python and cannot compile with fullgraph=True; "
                             "use grouped_mm or batched_mm, or pass fullgraph=False")
    if current(model) is not None:
        set_implementation(model, name)
    try:
        spec = state_of(model).spec
    except NotMoEError:  # a dense model compiles as it is
        spec = None
    prescaled = [b.path for b in spec.blocks if b.experts.call_style == "dense_prescaled"] if spec is not None else []
    restore_prescaled_blocks(model, prescaled)
    if name == DEFAULT_IMPLEMENTATION:
        route_prescaled_blocks(model, prescaled)
    return torch.compile(model, fullgraph=fullgraph, **compile_kwargs)
