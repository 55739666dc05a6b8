"""What a module of a transformers model is, read from its attributes and tensors: the routed-expert count it
declares, whether it holds fused ``[E, ...]`` expert tensors of its own, and its tensors by full name. Shared by
discovery (:mod:`moe_fx.model.trace`) and the graph check (:mod:`moe_fx.model.fx_check`)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from moe_fx.model.adapters import COUNT_ATTRS


def expert_count(module: nn.Module) -> int | None:
    """The routed-expert count a module declares through one of the usual attribute names."""
    for name in COUNT_ATTRS:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            return value
    return None


def tensors(module: nn.Module, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of ``module`` and its children, named ``prefix.name``."""
    for name, t in module.named_parameters(recurse=True):
        yield f"{prefix}.{name}", t
    for name, t in module.named_buffers(recurse=True):
        yield f"{prefix}.{name}", t


def direct_tensors(module: nn.Module, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The parameters and buffers of ``module`` itself (not its children), named ``prefix.name``."""
    for name, t in module.named_parameters(recurse=False):
        yield f"{prefix}.{name}", t
    for name, t in module.named_buffers(recurse=False):
        yield f"{prefix}.{name}", t


def is_routed_experts(module: nn.Module) -> bool:
    """A module holding fused ``[E, ...]`` 3D expert tensors of its own (not a router, not a parent)."""
    e = expert_count(module)
    return e is not None and any(t.ndim >= 3 and t.shape[0] == e for _, t in direct_tensors(module, ""))
