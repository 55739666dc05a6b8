"""QuantizeExperts: store every block's routed experts as FP8 or integer codes in memory, for the moe_fx kernels.

``quantize_experts_(model, "fp8-block")`` (in place, as torchao's ``quantize_``) replaces each fused projection
with its codes and registers its scales (:mod:`moe_fx.kernels.quantized`), then switches the model to the
``moe_fx`` experts implementation: on CUDA its Triton kernels read the codes (a decode step reads half the
expert bytes in FP8, a quarter in int4); elsewhere, and with gradients, it dequantizes only the experts a call
runs. Routers, shared experts, attention, norms, embeddings and the head keep their dtype. Composes after any
prune (per-layer expert counts and widths included): each block is quantized as it is.

This is the runtime form; it is not saved as is (``moe-fx quantize`` writes each scheme's checkpoint format,
:mod:`moe_fx.formats.quantized_checkpoint`, and :func:`moe_fx.load` with ``quantize=`` rebuilds this form).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moe_fx.errors import BadOptionError
from moe_fx.kernels import experts_module as layout
from moe_fx.kernels.implementation import DEFAULT_IMPLEMENTATION, set_implementation
from moe_fx.kernels.quantized import SCALE_SUFFIX, SCHEME_ATTR, check_scheme, dequantize, quantize, relative_error
from moe_fx.model.spec import MoEModelSpec
from moe_fx.model.trace import trace
from moe_fx.pipeline import MoEState, Pass, PassResult


def check_quantizable(model: nn.Module, spec: MoEModelSpec) -> None:
    """Refuse experts the moe_fx kernels cannot run quantized: modules without transformers' fused-experts flags
    (Llama 4's dense-prescaled experts, per-expert linear layers) and experts quantized already."""
    for block in spec.blocks:
        _check_module(model.get_submodule(block.experts.path), block.experts.path, block.experts.call_style == "routed")


def _check_module(experts: nn.Module, path: str, routed: bool = True) -> None:
    """:func:`check_quantizable` for one experts module at ``path`` (``routed``: its block's call style is)."""
    if not hasattr(experts, "has_gate") or not routed:
        raise BadOptionError(f"{path}: {type(experts).__name__} is not a transformers fused-experts module "
                             "that the moe_fx kernels run; its experts cannot be quantized in memory")
    if layout.quantization(experts) is not None:
        raise BadOptionError(f"{path}: experts are already quantized ({layout.quantization(experts)})")


def quantize_experts_(model: nn.Module, scheme: str, spec: MoEModelSpec | None = None) -> dict:
    """Quantize every block's routed experts of ``model`` in place with ``scheme``; returns the bytes of the
    experts' weights before and after (codes and scales) and the largest relative weight error. A loaded
    checkpoint whose experts are held in width buckets (per-expert widths) has each bucket quantized: a bucket
    is the family's experts module at one width, so the kernels run it as any other."""
    check_scheme(scheme)
    blocks = _experts_modules(model, spec)
    before = after = 0
    worst = 0.0
    for experts in (module for modules in blocks for module in modules):
        b, a, w = _quantize_module_(experts, scheme)
        before, after, worst = before + b, after + a, max(worst, w)
    set_implementation(model, DEFAULT_IMPLEMENTATION)
    return {"scheme": scheme, "blocks": len(blocks), "experts_bytes_before": before, "experts_bytes": after, "max_relative_error": worst}


def _experts_modules(model: nn.Module, spec: MoEModelSpec | None) -> list[list[nn.Module]]:
    """Each block's experts modules to quantize, refused (:func:`check_quantizable`) before any is changed: its
    experts module, or for a model holding width buckets (which ``trace`` refuses) its buckets, found from the
    per-layer layout its config records for every block."""
    from moe_fx.model.per_layer import LAYOUT_KEY, has_buckets

    if spec is not None or not has_buckets(model):
        spec = spec or trace(model)
        check_quantizable(model, spec)
        return [[model.get_submodule(block.experts.path)] for block in spec.blocks]
    paths = []  # per block, the paths of its experts modules
    for block in getattr(model.config, LAYOUT_KEY)["blocks"].values():
        if block.get("buckets"):
            module = block["buckets"]["module"]
            paths.append([f"{module}.buckets.{b}" for b in range(len(model.get_submodule(module).buckets))])
        else:  # the block's per-expert tensors are its experts module's parameters
            paths.append(list(dict.fromkeys(name.rpartition(".")[0] for name in block["shapes"])))
    for path in (p for block in paths for p in block):
        _check_module(model.get_submodule(path), path)
    return [[model.get_submodule(p) for p in block] for block in paths]


def _quantize_module_(experts: nn.Module, scheme: str) -> tuple[int, int, float]:
    """One experts module's projections as codes and scales, in place: (bytes before, bytes after, largest
    relative weight error)."""
    before = after = 0
    worst = 0.0
    for name in (layout.up_projection_name(experts), "down_proj"):
        weight = getattr(experts, name).detach()
        dense = weight.transpose(-2, -1) if experts.is_transposed else weight
        # concatenated gate and up halves get FP8 blocks of their own, as the hub's per-expert tensors have
        halves = (dense.shape[-2] // 2,) * 2 if name == "gate_up_proj" and getattr(experts, "is_concatenated", True) else None
        codes, scale = quantize(dense, scheme, segments=halves)
        worst = max(worst, relative_error(dense, dequantize(codes, scale, scheme)))
        before += weight.numel() * weight.element_size()
        after += codes.numel() * codes.element_size() + scale.numel() * scale.element_size()
        delattr(experts, name)
        experts.register_parameter(name, nn.Parameter(codes, requires_grad=False))
        experts.register_buffer(name + SCALE_SUFFIX, scale)
    setattr(experts, SCHEME_ATTR, scheme)
    return before, after, worst


@dataclass
class QuantizeExperts(Pass):
    """Store the routed experts as ``scheme`` codes (``fp8-block``, ``int8-channel``, ``int4-group``) for the
    moe_fx kernels; the last pass of a recipe (later rewrites need dense weights)."""

    scheme: str = "fp8-block"
    name = "quantize_experts"

    def check_model(self, model: nn.Module, spec: MoEModelSpec) -> None:
        check_scheme(self.scheme)
        check_quantizable(model, spec)

    def run(self, model: nn.Module, state: MoEState) -> PassResult:
        return PassResult(model, True, quantize_experts_(model, self.scheme, state.spec))
