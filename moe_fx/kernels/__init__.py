"""The ``moe_fx`` experts implementation, registered in transformers' experts-implementation registry.

``model.set_experts_implementation("moe_fx")`` (or :func:`moe_fx.load`, :func:`moe_fx.compile` and the ONNX
exporter, which pick it by default) runs every routed-experts module of a transformers 5 model through
:func:`~moe_fx.kernels.forward.moe_fx_experts_forward`:

- decode and prefill: pairs sorted by expert and two ``moe_fx::grouped_mm`` calls (Triton on CUDA for few rows
  per expert and for fp32; CUTLASS grouped GEMM for many bf16 rows; torch's CPU kernel on the CPU); each
  routed expert's weights are read once, so a pruned model reads fewer bytes per step;
- compiles with ``fullgraph=True``, replays in CUDA graphs (static shapes, no host sync);
- under ``torch.export`` / ONNX: the distinct-experts path (:mod:`.distinct_forward`), no per-token weight copies.
"""

from __future__ import annotations

from transformers.integrations.moe import ExpertsInterface

from moe_fx.kernels.forward import moe_fx_experts_forward

NAME = "moe_fx"
"""The name ``set_experts_implementation`` takes."""


def register() -> None:
    """Make ``NAME`` a valid experts implementation for every transformers model (idempotent)."""
    ExpertsInterface.register(NAME, moe_fx_experts_forward)


__all__ = ["NAME", "moe_fx_experts_forward", "register"]
