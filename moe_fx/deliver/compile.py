"""``moe_fx.compile``: torch.compile a (pruned) MoE model in one piece, without graph breaks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moe_fx.deliver.graph.sibling_linears import fuse_sibling_linears, pack_sibling_linears
from moe_fx.errors import BadOptionError, NotMoEError
from moe_fx.kernels.decode_attention import replace_decode_attention
from moe_fx.kernels.implementation import DEFAULT_IMPLEMENTATION, current, set_implementation
from moe_fx.kernels.prescaled import restore_prescaled_blocks, route_prescaled_blocks
from moe_fx.kernels.topk import replace_topk
from moe_fx.model.trace import substituted
from moe_fx.pipeline import state_of

INFERENCE_OPTIONS = {"coordinate_descent_tuning": True}
"""Inductor config for graphs traced without gradients (``fused``), under the caller's ``options``.

With coordinate-descent tuning on, Inductor (on GPUs) lowers a matmul of one row, batch 1's projections and LM
head, to a reduction it generates and fuses with the RMSNorm before it, and times the launch configs of its own
kernels (norms, rotary embedding, cache writes, the experts' combine) instead of taking its heuristics' first
guess. 48 layers of Qwen3-30B-A3B decode at batch 1 in 4.22 ms a token instead of 4.41 on an H100 (one
process, ``benchmarks/decode.py`` variant option ``tune=off`` for the untuned row); 4 layers at batch 16 are
unchanged (1.585 against 1.583 ms). The cost is compile time: the first step (compile, CUDA graph capture, warm-up) took
108 s against 74 s for those 48 layers, 30 against 10 s for 4 (identical kernels of other layers share the tuning).
The configs are chosen by timing, so two compilations may pick different ones, and a reduction's rounding differs
with its block size: compiled logits can then differ in the last bits between runs.
``options={"coordinate_descent_tuning": False}`` turns it off (Inductor's heuristics: the same kernels every run)."""


class InductorBackend:
    """Inductor with ``torch.compile``'s ``mode`` and ``options`` (both may be given). A graph traced without
    gradients is first rewritten for inference (``fused``): its eligible ``topk`` calls become
    ``moe_fx::topk_rows`` (:func:`~moe_fx.kernels.topk.replace_topk`: CUDA rows of up to 1,024 entries), its
    decode steps' attention calls ``moe_fx::decode_attention``
    (:func:`~moe_fx.kernels.decode_attention.replace_decode_attention`), and with ``model``, its sibling projections one matmul (:func:`~moe_fx.deliver.graph.sibling_linears.fuse_sibling_linears`);
    it compiles with :data:`INFERENCE_OPTIONS` under ``options``."""

    def __init__(self, mode: str | None = None, options: dict[str, Any] | None = None, dynamic: bool | None = None,
                 fused: bool = True, model: nn.Module | None = None) -> None:
        self.inductor = torch._TorchCompileInductorWrapper(mode, options, dynamic)
        self.inference_options = {k: v for k, v in INFERENCE_OPTIONS.items() if k not in (options or {})}
        self.fused = fused
        self.model = model
        self.rewrites = {"topk": 0, "attention": 0, "linear": 0}
        """Over every graph compiled so far: ``topk`` and one-query ``attention`` calls replaced, ``linear`` calls
        folded into another."""

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        if not self.fused or torch.is_grad_enabled():
            return self.inductor(gm, example_inputs)
        self.rewrites["topk"] += replace_topk(gm)
        self.rewrites["attention"] += replace_decode_attention(gm)
        if self.model is not None:
            self.rewrites["linear"] += fuse_sibling_linears(gm, self.model)
        from torch._inductor import config

        with config.patch(self.inference_options):
            return self.inductor(gm, example_inputs)

    def reset(self) -> None:
        """What ``torch._dynamo.reset()`` calls on backends: Inductor's drops its CUDA graph trees."""
        self.inductor.reset()


def compile_model(model: nn.Module, *, experts_implementation: str | None = None, fullgraph: bool = True, fused: bool = True,
                  **compile_kwargs: Any) -> nn.Module:
    """Switch the routed experts to an implementation that compiles whole, then ``torch.compile`` the model.

    The default (:data:`~moe_fx.kernels.implementation.DEFAULT_IMPLEMENTATION`) compiles with ``fullgraph=True``
    on CPU and CUDA; ``eager`` experts loop over the experts hit, a data-dependent graph break, so it is
    refused with ``fullgraph``. With the default, blocks whose experts transformers runs densely on prescaled
    inputs (Llama 4) run only their routed experts (:mod:`moe_fx.kernels.prescaled`); any other implementation
    keeps transformers' dense call there. With Inductor (no ``backend`` given) and ``fused``, calls made without
    gradients run the routers' top-k on one small kernel (:mod:`moe_fx.kernels.topk`) instead of torch's sort and
    gather, decode steps' attention (one query token a row) on one small kernel (:mod:`moe_fx.kernels.decode_attention`)
    instead of SDPA's, and sibling projections of one input (q/k/v) as one matmul over their packed weights
    (:mod:`moe_fx.deliver.graph.sibling_linears`), and Inductor tunes its own kernels' launch configs
    (:data:`INFERENCE_OPTIONS`: longer compiles, faster decode). The module is changed in place (its experts implementation,
    those blocks' forward and, with ``fused``, where sibling projections' weights live: same values and names)
    and the compiled wrapper returned; extra keyword arguments (``mode``, ``options``, ``dynamic``, ``backend``)
    go to ``torch.compile``.
    """
    name = experts_implementation or DEFAULT_IMPLEMENTATION
    if name == "eager" and fullgraph:
        raise BadOptionError("eager experts loop over the experts hit in Python and cannot compile with fullgraph=True; "
                             "use grouped_mm or batched_mm, or pass fullgraph=False")
    if current(model) is not None:
        set_implementation(model, name)
    try:
        # experts substituted by constants (routed experts only, which trace refuses to rewrite) need no block changed
        spec = None if substituted(model) else state_of(model).spec
    except NotMoEError:  # a dense model compiles as it is
        spec = None
    prescaled = [b.path for b in spec.blocks if b.experts.call_style == "dense_prescaled"] if spec is not None else []
    restore_prescaled_blocks(model, prescaled)
    if name == DEFAULT_IMPLEMENTATION:
        route_prescaled_blocks(model, prescaled)
    if compile_kwargs.get("backend", "inductor") == "inductor":
        if fused:
            pack_sibling_linears(model)
        compile_kwargs["backend"] = InductorBackend(compile_kwargs.pop("mode", None), compile_kwargs.pop("options", None),
                                                    compile_kwargs.get("dynamic"), fused, model)
    return torch.compile(model, fullgraph=fullgraph, **compile_kwargs)
