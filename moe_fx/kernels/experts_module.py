"""What every moe_fx experts path reads from a transformers experts module, whatever its family.

transformers' ``use_experts_implementation`` decorator describes each experts class with flags: ``has_gate``
(``gate_up_proj`` or ``up_proj`` only), ``has_bias``, ``is_transposed`` (GPT-OSS stores ``[E, in, out]``
instead of ``[E, out, in]``), ``has_post_expert_norm``, and ``_apply_gate`` (the family's gating: SwiGLU on
concatenated or interleaved halves, clamped GLU, ...). Reading only these keeps the moe_fx paths family-agnostic:
a family the decorator describes runs without an adapter.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_fx.errors import BadOptionError
from moe_fx.kernels.quantized import SCALE_SUFFIX, SCHEME_ATTR, QuantizedWeight

Weight = torch.Tensor | QuantizedWeight
"""A projection's fused weight as the paths read it: dense, or codes and scales (:mod:`.quantized`)."""


def up_projection(experts: nn.Module) -> tuple[Weight, torch.Tensor | None]:
    """The first projection's fused weight and bias (``None`` without biases)."""
    name = up_projection_name(experts)
    return _weight(experts, name), getattr(experts, name + "_bias") if experts.has_bias else None


def down_projection(experts: nn.Module) -> tuple[Weight, torch.Tensor | None]:
    """The down projection's fused weight and bias (``None`` without biases)."""
    return _weight(experts, "down_proj"), experts.down_proj_bias if experts.has_bias else None


def up_projection_name(experts: nn.Module) -> str:
    return "gate_up_proj" if experts.has_gate else "up_proj"


def _weight(experts: nn.Module, name: str) -> Weight:
    scheme = quantization(experts)
    if scheme is None:
        return getattr(experts, name)
    return QuantizedWeight(getattr(experts, name), getattr(experts, name + SCALE_SUFFIX), scheme, experts.is_transposed)


def quantization(experts: nn.Module) -> str | None:
    """The scheme of an experts module's quantized weights (``None``: dense)."""
    return getattr(experts, SCHEME_ATTR, None)


def activate(experts: nn.Module, proj: torch.Tensor) -> torch.Tensor:
    """The family's gating (``[..., 2I] -> [..., I]``) or plain activation on the up projection's output
    (transformers before 5.2x has no ``_apply_gate``: concatenated SwiGLU halves then)."""
    if not experts.has_gate:
        return experts.act_fn(proj)
    if hasattr(experts, "_apply_gate"):
        return experts._apply_gate(proj)
    gate, up = proj.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def zero_maps_to_zero(experts: nn.Module, parts: int, width: int, like: torch.Tensor) -> bool:
    """Whether the experts' gating of an all-zero projection output is zero (SwiGLU, GPT-OSS's clamped GLU, ReLU, GELU)."""
    try:
        out = activate(experts, like.new_zeros(1, parts * width))
    except (AttributeError, RuntimeError, TypeError):
        return False
    return bool(out.eq(0).all())


def post_norm(experts: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """The per-expert output norm of the families that have one, before the routing weights apply."""
    return experts.post_expert_norm(out) if getattr(experts, "has_post_expert_norm", False) else out


def expert_mlp(experts: nn.Module, x: torch.Tensor, expert_ids: torch.Tensor, matmul) -> torch.Tensor:
    """Rows through their experts: up projection, bias, the family's gating, down projection, bias, post-expert
    norm. ``expert_ids`` indexes the biases for the output rows (it broadcasts: the export path passes the
    distinct experts for a ``[T, U, out]`` output); ``matmul(x, weight, first)`` multiplies rows by their
    experts' weights (``first``: the up projection), which is all the moe_fx paths do differently."""
    up, up_bias = up_projection(experts)
    down, down_bias = down_projection(experts)
    proj = matmul(x, up, True)
    if up_bias is not None:
        proj = proj + up_bias[expert_ids]
    out = matmul(activate(experts, proj), down, False)
    if down_bias is not None:
        out = out + down_bias[expert_ids]
    return post_norm(experts, out)


def check_supported(experts: nn.Module) -> None:
    """Refuse expert-parallel modules: their routing carries sentinel ids for experts held by other ranks."""
    if getattr(experts, "_is_expert_parallel", False):
        raise BadOptionError(f"{type(experts).__name__} is expert-parallel; the moe_fx experts implementation runs whole experts modules only")
