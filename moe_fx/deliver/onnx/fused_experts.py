"""Routed experts as one onnxruntime ``com.microsoft.MoE`` (or ``QMoE``) node per block, instead of plain ops.

onnxruntime's MoE kernels (CPU and CUDA) run a block's experts in one node: grouped GEMMs over the tokens each
expert got, the gated activation fused. The plain-op path (:mod:`moe_fx.kernels.distinct_forward`) runs every
token through every expert any token picked, which is what makes prefill slow.

How a block becomes one node:

1. :func:`plan_fusion` decides per experts module whether the operator computes it: the family's gating is
   compared numerically with the operator's SwiGLU (``G * sigmoid(alpha G) * (L + beta)``, optional clamp) on
   concatenated or interleaved halves, or with its plain activations; an output norm after the experts, or
   gating that matches no form, keeps the block on the plain-op path, with the reason recorded.
2. During the export trace, the ``moe_fx_onnx`` experts implementation calls ``moe_fx::onnx_moe`` for fused
   blocks. Where the block's routing is what the operator computes itself (softmax over the router's logits,
   top-k, optionally renormalized; no selection bias, no groups: Qwen, Mixtral, OLMoE, ...) and a sample
   forward confirms it (:func:`route_in_operator`), the node takes the router's raw logits
   (``normalize_routing_weights`` as the block renormalizes): the model's routing ops (softmax, top-k, sum,
   division) leave the graph. Otherwise routing stays in the model's own ops (any rule: softmax, sigmoid,
   groups, biases, scaling): the operator, which computes ``softmax`` then top-k of its ``router_probs``, gets
   ``log(w / sum w)`` at the chosen experts and ``-1e4`` elsewhere, so it picks exactly the model's experts
   with weights ``w / sum w``; the output is multiplied by ``sum w`` again.
3. The op becomes a placeholder node ``moe_fx.FusedExperts`` in the ONNX graph (through the exporter's
   translation table), and :func:`lower_fused_experts` rewrites each into ``com.microsoft.MoE`` with its weights
   in the operator's layout (``[E, 2I, H]`` gate/up interleaved, ``[E, H, I]``), or ``QMoE`` with int8/int4
   block-quantized weights (:mod:`.quantized_weights`).

A pruned block is just smaller tensors on its own node, so per-layer expert counts and (zero-padded) per-expert
widths need nothing special.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moe_fx.deliver.onnx.quantized_weights import WEIGHT_FORMATS, block_size_for, dequantize_blocks, quantize_blocks
from moe_fx.errors import MoeFxError
from moe_fx.kernels import distinct_forward
from moe_fx.kernels import experts_module as layout
from moe_fx.model.routing import matches_recorded
from moe_fx.model.spec import MoEBlockSpec, MoEModelSpec, RouterSpec
from moe_fx.model.tensors import get_tensor

IMPLEMENTATION = "moe_fx_onnx"
"""The experts implementation the export traces with when blocks are fused."""

PLACEHOLDER_DOMAIN = "moe_fx"
PLACEHOLDER_OP = "FusedExperts"
UNCHOSEN_LOGIT = -1e4
"""``router_probs`` of the experts a token did not pick: ``exp`` of it is exactly 0 in float32 and float16."""

_SWIGLU_FORMS = ((1.0, 0.0, math.inf),)
"""(alpha, beta, limit) of plain SiLU gating; a module's own ``alpha``/``limit`` (GPT-OSS) adds its form."""
_PLAIN_ACTIVATIONS = ("silu", "gelu", "relu", "identity")


@dataclass(frozen=True)
class FusedLayout:
    """How one experts module maps onto the operator: its activation and where its weights sit."""

    block: str
    experts: str
    """The experts module's path."""
    top_k: int
    activation: str
    """``swiglu`` (gated experts) or one of the plain activations."""
    interleaved: bool
    """Gate and up rows alternate in the stored fused projection (GPT-OSS); else ``[gate | up]``."""
    transposed: bool
    alpha: float = 1.0
    beta: float = 0.0
    limit: float = math.inf
    router: tuple[str, str | None] | None = None
    """``(weight, bias)`` names of the router whose raw logits the node takes, where the operator computes the
    block's routing itself (:func:`route_in_operator`); ``None``: the model's routing, encoded in the logits."""
    normalize: bool = False
    """With ``router``: the operator renormalizes the top-k probabilities (``normalize_routing_weights``)."""
    scale: float = 1.0
    """With ``router``: the block's ``routed_scaling_factor``, applied to the node's output."""


_plans: weakref.WeakKeyDictionary[nn.Module, FusedLayout] = weakref.WeakKeyDictionary()
"""The fused experts modules of the export in progress (the implementation reads it)."""
_routers: weakref.WeakKeyDictionary[nn.Module, tuple[torch.Tensor, torch.Tensor | None]] = weakref.WeakKeyDictionary()
"""Their routers' ``(weight, bias)`` where the node takes the raw logits (``FusedLayout.router``)."""
SAMPLE_IDS = (2, 12)
"""Shape of the token ids of :func:`route_in_operator`'s sample forward."""


def _swiglu(proj: torch.Tensor, interleaved: bool, alpha: float, beta: float, limit: float) -> torch.Tensor:
    """The operator's gated activation on ``[N, 2I]`` pre-activations."""
    gate, up = (proj[..., 0::2], proj[..., 1::2]) if interleaved else proj.chunk(2, dim=-1)
    gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return gate * torch.sigmoid(alpha * gate) * (up + beta)


def _plain(proj: torch.Tensor, activation: str) -> torch.Tensor:
    return {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu, "relu": torch.relu,
            "identity": lambda t: t}[activation](proj)


def _match_activation(experts: nn.Module, width: int) -> tuple[str, bool, float, float, float] | None:
    """The operator's activation that reproduces the module's own on random pre-activations (large enough to
    reach GPT-OSS's clamp), or ``None``."""
    proj = torch.randn(64, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 6
    with torch.no_grad():
        want = layout.activate(experts, proj.to(torch.float32)).double()
    if experts.has_gate:
        forms = list(_SWIGLU_FORMS)
        if hasattr(experts, "alpha") and hasattr(experts, "limit"):
            forms.append((float(experts.alpha), 1.0, float(experts.limit)))
        for alpha, beta, limit in forms:
            for interleaved in (False, True):
                if torch.allclose(_swiglu(proj, interleaved, alpha, beta, limit), want, rtol=1e-4, atol=1e-4):
                    return "swiglu", interleaved, alpha, beta, limit
        return None
    for activation in _PLAIN_ACTIVATIONS:
        if torch.allclose(_plain(proj, activation), want, rtol=1e-4, atol=1e-4):
            return activation, False, 1.0, 0.0, math.inf
    return None


def fusion_of(experts: nn.Module, block: str, path: str, top_k: int) -> FusedLayout | str:
    """How ``experts`` (the module at ``path``) maps onto ``com.microsoft.MoE``, or why it does not (one line)."""
    if getattr(experts, "has_post_expert_norm", False):
        return "a norm after each expert's down projection (the operator has none)"
    up, _ = layout.up_projection(experts)
    match = _match_activation(experts, up.shape[2] if experts.is_transposed else up.shape[1])
    if match is None:
        return f"its gating ({type(experts).__name__}) is none of the operator's activations (SwiGLU with alpha/beta/limit, silu, gelu, relu)"
    activation, interleaved, alpha, beta, limit = match
    return FusedLayout(block, path, top_k, activation, interleaved, bool(experts.is_transposed), alpha, beta, limit)


def plan_fusion(model: nn.Module, spec: MoEModelSpec) -> dict[str, FusedLayout | str]:
    """Per block path: its :class:`FusedLayout`, or the reason it stays on the plain-op path."""
    plan: dict[str, FusedLayout | str] = {}
    for block in spec.blocks:
        experts = model.get_submodule(block.experts.path)
        if not hasattr(experts, "has_gate"):
            plan[block.path] = f"{type(experts).__name__} is not a transformers fused experts module"
            continue
        plan[block.path] = fusion_of(experts, block.path, block.experts.path, block.router.top_k)
    return plan


def operator_rule(router: RouterSpec) -> bool:
    """Whether the router's rule is the operator's own: softmax over all logits, top-k, optionally renormalized
    (no selection bias, no group-limited choice)."""
    return router.score_fn == "softmax" and router.selection_bias is None and not (router.n_group and router.n_group > 1)


def route_in_operator(model: nn.Module, spec: MoEModelSpec, plan: dict[str, FusedLayout | str],
                      quantized: bool = False) -> dict[str, FusedLayout | str]:
    """``plan`` with each fused block whose routing the operator can compute from the router's raw logits marked
    so (``FusedLayout.router``). The spec must say the rule is the operator's (:func:`operator_rule`), and one
    sample forward must show it: the router reads the experts' own input, and routing the router's logits by
    the spec picks the experts the model picked, with the weights it handed them (scale and normalization
    included), for every token. A router that transforms its
    logits or reads another input (the spec cannot tell) keeps the encoded routing, as does every block if the
    sample forward fails. ``quantized`` (``QMoE`` nodes): only renormalizing routers, because onnxruntime's CPU
    ``QMoE`` (1.32) weighs the picks as if renormalized whatever ``normalize_routing_weights`` says (tiny
    Qwen3-MoE without renormalization: 0.024 of logit difference; encoded, exact)."""
    candidates = {b.path: b for b in spec.blocks
                  if isinstance(plan.get(b.path), FusedLayout) and b.experts.call_style == "routed" and operator_rule(b.router)
                  and (b.router.norm_topk_prob or not quantized)}
    if not candidates:
        return plan
    calls = _sample_routing(model, list(candidates.values()))
    routed = dict(plan)
    for path, block in candidates.items():
        if path in calls and _operator_reproduces(model, block, *calls[path]):
            routed[path] = dataclasses.replace(plan[path], router=(block.router.weight, block.router.bias),
                                               normalize=block.router.norm_topk_prob, scale=float(block.router.routed_scaling_factor))
    return routed


def _sample_routing(model: nn.Module, blocks: list[MoEBlockSpec]) -> dict[str, tuple]:
    """Per block: ``(router input, experts input, top_k_index, top_k_weights)`` of one forward on fixed tokens."""
    from moe_fx.calibrate.hooks import routing_args

    seen: dict[str, dict] = {}
    handles = []

    def record(path: str, key: str):
        def hook(module, args, kwargs):
            seen.setdefault(path, {})[key] = (args, kwargs)
        return hook

    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, SAMPLE_IDS, generator=torch.Generator().manual_seed(0)).to(device)
    try:
        for b in blocks:
            handles.append(model.get_submodule(b.router.path).register_forward_pre_hook(record(b.path, "router"), with_kwargs=True))
            handles.append(model.get_submodule(b.experts.path).register_forward_pre_hook(record(b.path, "experts"), with_kwargs=True))
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError):
        return {}
    finally:
        for h in handles:
            h.remove()
    calls = {}
    for path, call in seen.items():
        if set(call) == {"router", "experts"}:
            (r_args, r_kwargs), (e_args, e_kwargs) = call["router"], call["experts"]
            with contextlib.suppress(StopIteration, IndexError, KeyError):  # an experts call of another form: not handed over
                calls[path] = (r_args[0] if r_args else r_kwargs.get("hidden_states"), *routing_args(e_args, e_kwargs))
    return calls


def _operator_reproduces(model: nn.Module, block: MoEBlockSpec, router_input, hidden, index, weights) -> bool:
    """Whether the router read ``hidden`` and its logits (in the model's dtype, as the graph computes them),
    routed by the spec, give exactly the experts ``index`` with the weights ``weights`` (within 1%: bf16 weights'
    rounding), scale and normalization included: what the node, times ``routed_scaling_factor``, hands the experts."""
    if not isinstance(router_input, torch.Tensor) or router_input.numel() != hidden.numel():
        return False
    if not torch.equal(router_input.reshape(hidden.shape), hidden):
        return False
    weight = get_tensor(model, block.router.weight)
    bias = get_tensor(model, block.router.bias) if block.router.bias else None
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        return False  # a router kept in another precision than its input: the node would compute other logits
    return matches_recorded(block.router, F.linear(hidden, weight, bias), None, index.reshape(-1, index.shape[-1]),
                            weights.reshape(-1, weights.shape[-1]), min_agreement=1.0, tol=1e-2, scale_free=False)


@torch.library.custom_op("moe_fx::onnx_moe", mutates_args=())
def onnx_moe(hidden: torch.Tensor, router_logits: torch.Tensor, up: torch.Tensor, up_bias: torch.Tensor | None,
             down: torch.Tensor, down_bias: torch.Tensor | None, block: str, top_k: int, activation: str,
             interleaved: bool, transposed: bool, alpha: float, beta: float, limit: float, normalize: bool) -> torch.Tensor:
    """What ``com.microsoft.MoE`` computes (``normalize_routing_weights=normalize``), on the module's stored
    tensors: softmax of ``router_logits``, the top-``top_k`` experts with those probabilities (renormalized over
    the ``top_k`` with ``normalize``), each expert's MLP. Eager only for the export's sample run; the graph gets
    the operator."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    up_w = up.transpose(1, 2) if transposed else up  # [E, out, in]
    down_w = down.transpose(1, 2) if transposed else down
    out = torch.zeros_like(hidden, dtype=torch.float32)
    for e in ids.unique().tolist():
        rows, slots = (ids == e).nonzero(as_tuple=True)
        proj = hidden[rows].float() @ up_w[e].float().T
        if up_bias is not None:
            proj = proj + up_bias[e].float()
        act = _swiglu(proj, interleaved, alpha, beta, limit) if activation == "swiglu" else _plain(proj, activation)
        y = act @ down_w[e].float().T
        if down_bias is not None:
            y = y + down_bias[e].float()
        out.index_add_(0, rows, y * weights[rows, slots, None])
    return out.to(hidden.dtype)


@onnx_moe.register_fake
def _(hidden, router_logits, up, up_bias, down, down_bias, block, top_k, activation, interleaved, transposed, alpha, beta, limit, normalize):
    return hidden.new_empty(hidden.shape)


def fused_experts_forward(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """The ``moe_fx_onnx`` experts implementation: fused blocks call ``moe_fx::onnx_moe`` with their router's raw
    logits where the operator routes as the block does (``FusedLayout.router``; the model's routing then has no
    use and leaves the graph), else with the model's routing encoded as logits (module docstring); the others
    take the plain-op path."""
    fused = _plans.get(experts)
    if fused is None:
        return distinct_forward.distinct_experts_forward(experts, hidden_states, top_k_index, top_k_weights)
    up, up_bias = layout.up_projection(experts)
    down, down_bias = layout.down_projection(experts)
    if fused.router is not None:
        weight, bias = _routers[experts]
        logits, normalize = F.linear(hidden_states, weight, bias).to(hidden_states.dtype), fused.normalize
    else:
        logits, total = _routing_as_logits(top_k_index, top_k_weights, up.shape[0], hidden_states)
        normalize = False
    out = torch.ops.moe_fx.onnx_moe(hidden_states, logits, up, up_bias, down, down_bias, fused.block, fused.top_k, fused.activation,
                                    fused.interleaved, fused.transposed, fused.alpha, fused.beta, fused.limit, normalize)
    if fused.router is None:
        return (out.float() * total).to(hidden_states.dtype)
    return out if fused.scale == 1.0 else out * fused.scale


def _routing_as_logits(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int,
                       hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's routing as logits the operator's softmax turns back into it (module docstring), and the
    weights' sum per token that the output is multiplied by (the operator's weights sum to one)."""
    weights = top_k_weights.float()
    total = weights.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    chosen = torch.log(weights / total).clamp_min(UNCHOSEN_LOGIT)
    logits = torch.full((hidden_states.shape[0], num_experts), UNCHOSEN_LOGIT, dtype=torch.float32, device=hidden_states.device)
    return logits.scatter(1, top_k_index, chosen).to(hidden_states.dtype), total


def _translate(hidden, router_logits, up, up_bias, down, down_bias, block: str, top_k: int, activation: str,
               interleaved: bool, transposed: bool, alpha: float, beta: float, limit: float, normalize: bool):
    """The ONNX for ``moe_fx::onnx_moe``: a placeholder node holding the stored tensors and their layout, which
    :func:`lower_fused_experts` turns into the operator once the weights can be rearranged as arrays."""
    from onnxscript.values import Op, Opset

    return Op(Opset(PLACEHOLDER_DOMAIN, 1), PLACEHOLDER_OP, _placeholder_schema())(
        hidden, router_logits, up, up_bias, down, down_bias, block=block, top_k=top_k, activation=activation,
        interleaved=int(interleaved), transposed=int(transposed), alpha=float(alpha), beta=float(beta),
        limit=float(limit) if math.isfinite(limit) else -1.0, normalize=int(normalize))


@functools.cache
def _placeholder_schema():
    """The placeholder's ONNX schema (onnxscript's tracer builds nodes only for ops with one)."""
    from onnx.defs import OpSchema

    tensor = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    param = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    inputs = [param("hidden", "T"), param("router_logits", "T"), param("up", "T"), param("up_bias", "T", param_option=optional),
              param("down", "T"), param("down_bias", "T", param_option=optional)]
    attr = OpSchema.AttrType
    attributes = [OpSchema.Attribute(name, kind, "") for name, kind in (
        ("block", attr.STRING), ("top_k", attr.INT), ("activation", attr.STRING), ("interleaved", attr.INT),
        ("transposed", attr.INT), ("alpha", attr.FLOAT), ("beta", attr.FLOAT), ("limit", attr.FLOAT), ("normalize", attr.INT))]
    return OpSchema(PLACEHOLDER_OP, PLACEHOLDER_DOMAIN, 1, inputs=inputs, outputs=[param("output", "T")],
                    type_constraints=[("T", tensor, "")], attributes=attributes)


@contextlib.contextmanager
def fused_export(model: nn.Module, fused: list[FusedLayout]) -> Iterator[None]:
    """Trace ``model`` with the ``fused`` blocks calling the op, and the exporter translating it."""
    from transformers.exporters import exporter_onnx
    from transformers.integrations.moe import ExpertsInterface

    table = getattr(exporter_onnx, "_ONNX_TRANSLATION_TABLE", None)
    if not isinstance(table, dict):
        import transformers

        raise MoeFxError(f"transformers {transformers.__version__}'s ONNX exporter takes no translation table, so the fused MoE "
                         "node cannot be emitted: export with --moe-op unfused")
    ExpertsInterface.register(IMPLEMENTATION, fused_experts_forward)
    for how in fused:
        experts = model.get_submodule(how.experts)
        _plans[experts] = how
        if how.router is not None:
            weight, bias = how.router
            _routers[experts] = (get_tensor(model, weight), get_tensor(model, bias) if bias else None)
    key = torch.ops.moe_fx.onnx_moe.default
    before = model.get_experts_implementation()
    table[key] = _translate
    try:
        model.set_experts_implementation(IMPLEMENTATION)
        yield
    finally:
        model.set_experts_implementation(before)
        table.pop(key, None)
        _plans.clear()
        _routers.clear()


def _gate_up_interleaved(array: np.ndarray, interleaved: bool) -> np.ndarray:
    """``[E, 2I, ...]`` with gate and up rows alternating (what the CPU kernel takes, ``swiglu_fusion=1``)."""
    if interleaved:
        return array
    gate, up = np.split(array, 2, axis=1)
    return np.stack([gate, up], axis=2).reshape(array.shape)


def register_constant(graph, name: str, array: np.ndarray | torch.Tensor):
    """``array`` as the graph's initializer ``name`` (a torch tensor keeps dtypes numpy lacks: bfloat16); its value."""
    import onnx_ir as ir

    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def lower_fused_experts(graph, weights: str = "float") -> list[str]:
    """Rewrite every placeholder node of ``graph`` into ``com.microsoft.MoE`` (``weights="float"``) or ``QMoE``
    (``int8``/``int4``, one of ``WEIGHT_FORMATS``, checked by the export), its weights in the operator's layout;
    return the blocks rewritten. The module's stored tensors, read by nothing else, leave the graph."""
    import onnx_ir as ir

    lowered = []
    for node in [n for n in graph.all_nodes() if n.domain == PLACEHOLDER_DOMAIN and n.op_type == PLACEHOLDER_OP]:
        attrs = {name: attr.value for name, attr in node.attributes.items()}
        hidden, logits, up, up_bias, down, down_bias = (list(node.inputs) + [None] * 6)[:6]
        block = attrs["block"]
        gated = attrs["activation"] == "swiglu"
        stored = [_array(v, block) if v is not None else None for v in (up, up_bias, down, down_bias)]
        fc1, fc1_bias, fc2, fc2_bias = stored
        if attrs["transposed"]:
            fc1, fc2 = fc1.transpose(0, 2, 1), fc2.transpose(0, 2, 1)
        if gated:
            fc1 = _gate_up_interleaved(fc1, attrs["interleaved"])
            fc1_bias = _gate_up_interleaved(fc1_bias, attrs["interleaved"]) if fc1_bias is not None else None
        op_attrs = {"k": attrs["top_k"], "activation_type": attrs["activation"], "normalize_routing_weights": attrs["normalize"]}
        if gated:
            op_attrs.update(swiglu_fusion=1, activation_alpha=attrs["alpha"], activation_beta=attrs["beta"])
            if attrs["limit"] >= 0:
                op_attrs["swiglu_limit"] = attrs["limit"]
        prefix = f"{block}.moe"

        def const(name: str, array: np.ndarray | None):
            return None if array is None else register_constant(graph, f"{prefix}.{name}", np.ascontiguousarray(array))

        if weights == "float":
            inputs = [hidden, logits, const("fc1", fc1), const("fc1_bias", fc1_bias), const("fc2", fc2), const("fc2_bias", fc2_bias)]
            op_type = "MoE"
        else:
            block_size = block_size_for(weights, fc2.shape[1], fc2.shape[2])
            q1, s1 = quantize_blocks(fc1, weights, block_size)
            q2, s2 = quantize_blocks(fc2, weights, block_size)
            scale_dtype = fc1.dtype
            inputs = [hidden, logits, const("fc1_q", q1), const("fc1_scales", s1.astype(scale_dtype)), const("fc1_bias", fc1_bias),
                      const("fc2_q", q2), const("fc2_scales", s2.astype(scale_dtype)), const("fc2_bias", fc2_bias)]
            op_type = "QMoE"
            op_attrs.update(expert_weight_bits=WEIGHT_FORMATS[weights], weights_prepacked=0, quant_type="int")
            if block_size:
                op_attrs["block_size"] = block_size
        fused = ir.node(op_type, inputs=inputs, attributes=op_attrs, domain="com.microsoft", name=f"{prefix}")
        fused.outputs[0].shape, fused.outputs[0].dtype = node.outputs[0].shape, node.outputs[0].dtype
        node.graph.insert_before(node, fused)
        node.outputs[0].replace_all_uses_with(fused.outputs[0])
        if node.outputs[0].is_graph_output():
            raise MoeFxError(f"{block}: the fused experts output is a graph output; please report the model family")
        node.graph.remove(node, safe=True)
        for value in (up, up_bias, down, down_bias):
            if value is not None and not value.uses() and value.name in graph.initializers:
                graph.initializers.pop(value.name)
        lowered.append(block)
    if lowered:
        graph.opset_imports["com.microsoft"] = 1
        graph.opset_imports.pop(PLACEHOLDER_DOMAIN, None)
    return lowered


def _array(value, block: str) -> np.ndarray:
    if value.const_value is None:
        raise MoeFxError(f"{block}: the experts' weights are not constants of the exported graph; export with --moe-op unfused")
    return value.const_value.numpy()


def dequantized_weights(experts: nn.Module, weights: str) -> dict[str, torch.Tensor]:
    """The module's expert weights as the quantized node computes with them (quantized in the operator's
    layout, dequantized back into the module's): the parity reference of an int8/int4 export."""
    down = layout.down_projection(experts)[0]
    hidden, inter = (down.shape[2], down.shape[1]) if experts.is_transposed else (down.shape[1], down.shape[2])
    block_size = block_size_for(weights, hidden, inter)
    out = {}
    for name, tensor in (("gate_up_proj" if experts.has_gate else "up_proj", layout.up_projection(experts)[0]),
                         ("down_proj", layout.down_projection(experts)[0])):
        array = tensor.detach().float().cpu().numpy()
        oriented = array.transpose(0, 2, 1) if experts.is_transposed else array  # [E, out, in]
        back = dequantize_blocks(*quantize_blocks(oriented, weights, block_size), weights, block_size, oriented.shape[-1])
        back = back.transpose(0, 2, 1) if experts.is_transposed else back
        out[name] = torch.from_numpy(np.ascontiguousarray(back)).to(tensor.dtype)
    return out
