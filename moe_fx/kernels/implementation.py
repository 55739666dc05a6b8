"""Which transformers experts implementation runs the routed experts, and switching it safely.

transformers 5 runs a fused experts module through one of ``eager`` (a Python loop over the experts hit:
data-dependent, so it neither compiles without graph breaks nor exports), ``grouped_mm`` (one grouped GEMM:
each active expert's weights read once; an opaque op to ONNX) or ``batched_mm`` (each (token, slot) gathers
its expert's weights and runs one batched GEMM: plain ops that export everywhere, but its memory grows with
tokens x top-k x expert size). moe-fx registers a fourth, ``moe_fx`` (:mod:`moe_fx.kernels`): each
routed expert's weights read once at any token count, whole-graph compilable, CUDA-graph capturable and
exportable without per-token weight copies; moe-fx uses it by default. The choice is not saved in the
config, so every consumer sets it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from moe_fx import kernels as moe_experts
from moe_fx.errors import BadOptionError

moe_experts.register()

IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm", moe_experts.NAME)

DEFAULT_IMPLEMENTATION = moe_experts.NAME
"""What moe-fx runs loaded, compiled and exported models with: it compiles with ``fullgraph=True`` on CPU and
CUDA in every dtype, reads each routed expert's weights once per step (what decode is bound by), and exports
to ONNX in plain ops (``grouped_mm`` has no ONNX kernel, ``batched_mm`` copies weights per token)."""


def current(model: nn.Module) -> str | None:
    """The model's experts implementation (``None`` for a model without the switch)."""
    getter = getattr(model, "get_experts_implementation", None)
    return getter() if getter is not None else None


def set_implementation(model: nn.Module, name: str) -> None:
    """Switch every experts module of ``model`` to ``name``; a bad name or an unswitchable model raise."""
    if name not in IMPLEMENTATIONS:
        raise BadOptionError(f"unknown experts implementation {name!r}; use one of {', '.join(IMPLEMENTATIONS)}")
    if current(model) is None:
        raise BadOptionError(f"{type(model).__name__} has no switchable experts implementation (needs transformers 5 fused experts)")
    try:
        model.set_experts_implementation(name)
    except (ValueError, AttributeError) as exc:
        raise BadOptionError(f"{type(model).__name__} cannot use experts implementation {name!r}: {exc}") from None


@contextlib.contextmanager
def experts_implementation(model: nn.Module, name: str, *, required: bool = True) -> Iterator[None]:
    """Run the block with ``name`` as the experts implementation, restored on exit (also after an error).

    With ``required=False`` a model that cannot switch runs unchanged (discovery on families without the switch).
    """
    before = current(model)
    try:
        set_implementation(model, name)
    except BadOptionError:
        if required:
            raise
        yield
        return
    try:
        yield
    finally:
        model.set_experts_implementation(before)
