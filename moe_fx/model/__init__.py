"""Understanding a model: the canonical MoE spec every pass reads, discovery (trace) through the family
adapters, the routing rule (simulated over kept experts), the fused expert tensors in every layout and the
math inside an expert, the config's description of per-layer shapes, and the decoder layers a streamed run
calls one at a time. Nothing here changes a model's weights except through :mod:`moe_fx.model.tensors`."""

from moe_fx.model import adapters, families  # noqa: F401  (the built-in family adapters are registered on import)
