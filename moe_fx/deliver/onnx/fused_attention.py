"""A static decode graph's attention as one onnxruntime ``com.microsoft.GroupQueryAttention`` node per layer.

Why: profiled on an H100 (``docs/benchmarks/speed.md``), a replayed static step of 4 Qwen3-30B-A3B layers spent
101 us of its 846 us of kernels at batch 1 in attention, and 255 of 1,958 at batch 16: the opset-23 ``Attention`` op
runs five kernels a layer (the kernel, masked-row zeroing, the key/value heads repeated to the query heads,
transposes), and the cache update is one ``ScatterElements`` per tensor. onnxruntime's ``GroupQueryAttention``
writes the new token's keys and values into the cache and attends over it in one node, reading the grouped
key/value heads as they are (what onnxruntime-genai's model builder emits).

How (:func:`group_query_attention`, around the static export's trace): first one decode step of the trace's
sample (put back afterwards), through the model's own attention, plans each layer: the node where the attention
reads the very tensors the cache update returned (MLA's reads keys expanded from a compressed cache instead) and
nothing below rules it out; and, where the node's computation from the raw q/k/v projections reproduces the
layer's output and cache update (:class:`_Projected`), the node rotates q and k itself. Then, in the trace, a
planned layer's cache update keeps the new token's keys and values aside instead of writing them, and the
attention call that follows hands them, the query and the layer's cache to ``moe_fx::onnx_gqa`` (a layer of
projected form runs :func:`_projected_forward` instead), which the exporter translates into the node; its
present outputs become the layer's cache, returned as ``present.{i}.key|value``. The node writes the token at
slot ``seqlens_k`` (the ``cache_position`` input, the same for every row) and attends to slots
``0..seqlens_k``; bound to one buffer with its past (the runners' IO binding), the write is in place. With
``--attention gqa-cuda`` a projected layer's node also applies the per-head q/k norms (a graph for onnxruntime's
CUDA kernel only), where the probe finds the node's norms reproduce the module's.

GPT-OSS's attention sinks become the node's ``head_sink`` and a sliding window its ``local_window_size`` over a
cache that holds every slot (:class:`_Softmax`). What it cannot express stays on the model's own attention, layer by
layer, with the reason recorded: logit soft-capping, key and value heads of different widths (MLA).
The node has no padding mask: every row of a batch holds the same number of tokens, so when every layer is
fused the graph has no ``attention_mask`` input (nor ``position_ids`` when every node rotates) and the runners
refuse a mask with padding in it.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import StaticLayer

from moe_fx.deliver.onnx.static_decode import cache_updates, scatter_update
from moe_fx.errors import MoeFxError

NAME = "moe_fx_onnx_gqa"
"""The attention implementation the static export traces with when attention is fused."""
ATTENTIONS = ("gqa", "gqa-cuda", "plain")
"""``--attention``: onnxruntime's GroupQueryAttention node per layer; the same with per-head q/k norms in the node
(``q_norm_weight``, which only onnxruntime's CUDA kernel takes); or the model's own attention ops."""
DOMAIN, OP = "com.microsoft", "GroupQueryAttention"
HALF_DTYPES = (torch.float16, torch.bfloat16)
"""The dtypes onnxruntime's CUDA GroupQueryAttention kernel runs (its CPU kernel also runs float32)."""

_state: dict = {"implementation": "sdpa", "calls": 0, "plan": {}, "forms": {}, "scales": {}, "softmax": {}, "every_dtype": False,
                "norms_in_node": False, "probing": False}
"""The pass in progress: the model's attention implementation, cache updates so far in this forward, the
per-layer plan (``None``: the node; else why not), the planned layers whose node also takes the raw projections
(:class:`_Projected`), each layer's softmax scale and :class:`_Softmax`, fuse float32 layers too, let the node apply
per-head q/k norms, and whether it is the probe."""
_pending: list = []
"""The cache update the next attention call consumes: ``[keys, values, seqlens_k, layer]`` (the node's layers), or
``[keys returned, values returned, layer]`` (the probe)."""
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class _Softmax:
    """What a layer's softmax takes besides the scaled logits of the cache's visible slots: GPT-OSS's per-head sink
    logits (``[heads]``, one more softmax term a head that attends to no value: the node's ``head_sink``) and a
    sliding window (the query's own slot and the ``window - 1`` before it: the node's ``local_window_size``; ``-1``:
    none). The cache holds every slot either way (``static_cache(full_windows=True)``)."""

    sinks: torch.Tensor | None = None
    window: int = -1


def _softmax_of(module: nn.Module, query: torch.Tensor, kwargs: dict) -> _Softmax | str:
    """The layer's :class:`_Softmax` from its attention call's arguments (GPT-OSS passes ``s_aux`` and
    ``sliding_window``), or why the node cannot take it."""
    sinks = kwargs.get("s_aux", getattr(module, "sinks", None))
    if sinks is not None and (not isinstance(sinks, torch.Tensor) or sinks.shape != (query.shape[1],)):
        return f"attention sinks of shape {tuple(getattr(sinks, 'shape', ()))}, not one per query head"
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    if window is not None and (not isinstance(window, int) or window < 1):
        return f"a sliding window of {window!r}"
    return _Softmax(None if sinks is None else sinks.detach(), -1 if window is None else window)


@dataclass(frozen=True)
class _Projected:
    """A layer whose node takes the q/k/v projections (q and k through the module's own norms, where it has them) and
    rotates q and k itself by ``cos``/``sin`` (``[L, D / 2]``, at the slot it writes), when the module is projections,
    optional norms, the rotary embedding, attention and the o projection: checked numerically by the probe, not
    assumed. ``norms``: the module's per-head RMS norms of q and k (weights and epsilon) applied by the node itself
    (``--attention gqa-cuda``: onnxruntime's CUDA kernel takes ``q_norm_weight``, its CPU kernel refuses it); without
    them the norms stay outside the node, where both kernels run them."""

    cos: torch.Tensor
    sin: torch.Tensor
    norms: tuple[torch.Tensor, torch.Tensor, float] | None = None


def _head_norms(module: nn.Module, width: int) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """The weights and shared epsilon of the module's per-head q and k RMS norms (Qwen3's ``q_norm``/``k_norm``, a
    weight of one head's width each), or ``None``; that they are RMS norms is checked numerically by the probe."""
    norms = [getattr(module, name, None) for name in ("q_norm", "k_norm")]
    weights = [getattr(norm, "weight", None) for norm in norms]
    eps = {getattr(norm, "variance_epsilon", getattr(norm, "eps", None)) for norm in norms}
    if not all(isinstance(w, torch.Tensor) and w.numel() == width for w in weights) or len(eps) != 1 or None in eps:
        return None
    return weights[0].detach(), weights[1].detach(), float(eps.pop())


def _normed(module: nn.Module, name: str, projected: torch.Tensor, width: int) -> torch.Tensor:
    """``projected`` (``[B, T, heads * D]``) through the module's norm ``name``, if it has one: per head where its weight
    has one head's width (Qwen3's), over the whole projection otherwise (OLMoE's)."""
    norm = getattr(module, name, None)
    if norm is None:
        return projected
    weight = getattr(norm, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.numel() == width:
        return norm(projected.unflatten(-1, (-1, width))).flatten(-2)
    return norm(projected)


def _rotary_caches(model: nn.Module, length: int, width: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``[length, width / 2]`` cos/sin of the model's one rotary embedding at positions ``0..length-1``, where its
    halves repeat (the rotation of halves against each other over the whole head) or it gives one half (GPT-OSS's)."""
    rotaries = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    if len(rotaries) != 1:
        return None
    weight = next(model.parameters())
    try:
        cos, sin = rotaries[0](torch.zeros(1, dtype=weight.dtype, device=weight.device), torch.arange(length, device=weight.device)[None])
    except (TypeError, RuntimeError, ValueError):
        return None
    cos, sin = cos[0], sin[0]
    half = width // 2
    if cos.shape[-1] == half:
        return cos.contiguous(), sin.contiguous()
    if cos.shape[-1] != width or not (torch.equal(cos[:, :half], cos[:, half:]) and torch.equal(sin[:, :half], sin[:, half:])):
        return None
    return cos[:, :half].contiguous(), sin[:, :half].contiguous()


def _seqlens(count: torch.Tensor, length: int, batch: int) -> torch.Tensor:
    """The node's ``seqlens_k`` (``[batch]`` int32) for ``length`` new tokens after ``count`` cached ones."""
    return (count + (length - 1)).to(torch.int32).expand(batch)


def _node(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
          seqlens: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, heads: int, scale: float, softmax: _Softmax,
          norms: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``moe_fx::onnx_gqa`` over the cache ``past_*``, its total length the cache's (a constant: what a CUDA graph
    replays)."""
    total = torch.tensor(past_key.shape[2], dtype=torch.int32)
    q_norm, k_norm, eps = norms if norms is not None else (None, None, 0.0)
    return torch.ops.moe_fx.onnx_gqa(query, key, value, past_key, past_value, seqlens, total, cos, sin, softmax.sinks, q_norm, k_norm,
                                     heads, past_key.shape[1], float(scale), softmax.window, eps)


def _projected(module: nn.Module, hidden: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor, seqlens: torch.Tensor,
               form: _Projected, scale: float, softmax: _Softmax) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The module's attention output (after ``o_proj``) and the cache as the node computes them from ``hidden``."""
    batch, length, _ = hidden.shape
    width = past_key.shape[-1]
    heads = module.q_proj.out_features // width
    q, k, v = (getattr(module, name)(hidden) for name in _PROJECTIONS[:3])
    if form.norms is None:
        q, k = _normed(module, "q_norm", q, width), _normed(module, "k_norm", k, width)
    out, keys, values = _node(q, k, v, past_key, past_value, seqlens, form.cos, form.sin, heads, scale, softmax, form.norms)
    return module.o_proj(out.view(batch, length, heads * width)), keys, values


def _verdict(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kwargs: dict, sliding: bool) -> str | _Softmax:
    """Why the node cannot compute this layer's attention, or, where it can, the layer's :class:`_Softmax`.
    ``sliding``: the layer's cache is a sliding-window one, whose window only its mask applies unless the attention
    call names it (Llama 4's chunks do not: the node would attend across them)."""
    if kwargs.get("softcap") is not None:
        return "logit soft-capping"
    if not getattr(module, "is_causal", True):
        return "bidirectional attention"
    if query.shape[-1] != key.shape[-1] or key.shape[-1] != value.shape[-1]:
        return f"key/value heads of widths {key.shape[-1]}/{value.shape[-1]} beside query heads of {query.shape[-1]}"
    if query.shape[1] % key.shape[1]:
        return f"{query.shape[1]} query heads over {key.shape[1]} key/value heads"
    if not _state["every_dtype"] and query.dtype not in HALF_DTYPES:
        return f"{str(query.dtype).removeprefix('torch.')}: onnxruntime's CUDA GroupQueryAttention runs float16/bfloat16 (--attention gqa fuses it for the CPU)"
    softmax = _softmax_of(module, query, kwargs)
    if isinstance(softmax, str):
        return softmax
    if sliding and softmax.window < 0:
        return "a windowed or chunked cache layer whose window the attention call does not name"
    return softmax


def _plain_attention(module: nn.Module):
    """The model's own attention function (transformers' registry; the family's eager function for ``eager``)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if _state["implementation"] == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[_state["implementation"]]


def _update(layer: StaticLayer, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The static layers' update while the probe or the trace runs. The probe writes (:func:`scatter_update`) and
    notes what it returned; the trace writes the layers the plan keeps plain, and for the node's layers only counts
    the tokens and returns the new keys and values, which the node writes."""
    index = _state["calls"]
    _state["calls"] += 1
    _pending.clear()
    if _state["probing"] or _state["plan"].get(index, "not probed") is not None:
        keys, values = scatter_update(layer, key_states, value_states)
        if _state["probing"]:
            _pending[:] = [keys, values, layer]
        return keys, values
    if not layer.is_initialized:
        layer.lazy_initialization(key_states, value_states)
    length = key_states.shape[-2]
    seqlens = _seqlens(layer.cumulative_length, length, key_states.shape[0])
    layer.cumulative_length.add_(length)
    _pending[:] = [key_states, value_states, seqlens, layer]
    return key_states, value_states


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
               scaling: float | None = None, dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature (query ``[B, heads, T, D]``; the output ``[B, T, heads, D]``). The
    probe plans the layer: the node when the attention reads the cache the update returned (MLA's attention reads
    keys expanded from a compressed cache instead) and :func:`_verdict` finds nothing against it; the trace follows the plan."""
    index = _state["calls"] - 1
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if _state["probing"]:
        _state["scales"][index] = scale
        reads_cache = len(_pending) == 3 and key is _pending[0] and value is _pending[1]
        verdict = _verdict(module, query, key, value, kwargs, _pending[2].is_sliding) if reads_cache else \
            "the attention reads keys and values derived from the cache, not the cache (MLA)"
        _state["plan"][index] = verdict if isinstance(verdict, str) else None
        if isinstance(verdict, _Softmax):
            _state["softmax"][index] = verdict
    elif len(_pending) == 4:
        new_key, new_value, seqlens, layer = _pending
        _pending.clear()
        if key is not new_key or value is not new_value:
            raise MoeFxError(f"layer {index}'s attention did not read the cache update the probe saw; export with --attention plain")
        batch, heads, length, width = query.shape
        flat = [x.transpose(1, 2).reshape(batch, length, -1) for x in (query, new_key, new_value)]
        out, layer.keys, layer.values = _node(*flat, layer.keys, layer.values, seqlens, None, None, heads, scale, _state["softmax"][index])
        return out.view(batch, length, heads, width), None
    return _plain_attention(module)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


@torch.library.custom_op("moe_fx::onnx_gqa", mutates_args=())
def onnx_gqa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
             seqlens_k: torch.Tensor, total_sequence_length: torch.Tensor, cos_cache: torch.Tensor | None, sin_cache: torch.Tensor | None,
             head_sink: torch.Tensor | None, q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None, num_heads: int,
             kv_num_heads: int, scale: float, local_window_size: int, qk_norm_epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What ``GroupQueryAttention`` computes over a cache shared with its output: the ``T`` new tokens' queries
    (``[B, T, heads * D]``), keys and values (``[B, T, kv_heads * D]``), queries and keys through per-head RMS norms
    of weights ``q_norm_weight`` / ``k_norm_weight`` (``[D]``) if given, then rotated by ``cos_cache`` /
    ``sin_cache`` (``[L, D / 2]``, the halves rotated against each other) at their slot if given; keys and values
    written at slots ``seqlens_k - T + 1 .. seqlens_k`` of
    ``past_*`` (``[B, kv_heads, L, D]``), each query attending causally to the slots up to its own (the
    ``local_window_size`` last of them, if not -1), with one more softmax term per head of logit ``head_sink`` if
    given. Eager for the export's sample run and the probe's check of a layer's form; the graph gets the operator."""
    batch, length, _ = query.shape
    width = past_key.shape[-1]
    slots = (seqlens_k.long() + 1 - length)[:, None] + torch.arange(length, device=query.device)  # [B, T]
    q, k, v = (x.view(batch, length, -1, width) for x in (query, key, value))
    if q_norm_weight is not None:
        q, k = (_rms(x, w, qk_norm_epsilon) for x, w in ((q, q_norm_weight), (k, k_norm_weight)))
    if cos_cache is not None:
        q, k = (_rotated(x, cos_cache[slots], sin_cache[slots]) for x in (q, k))
    index = slots[:, None, :, None].expand(batch, kv_num_heads, length, width)
    present = [past.scatter(2, index, new.transpose(1, 2)) for past, new in ((past_key, k), (past_value, v))]
    distance = slots[:, :, None] - torch.arange(past_key.shape[2], device=query.device)[None, None, :]  # [B, T, L]
    visible = (distance >= 0) & ((distance < local_window_size) if local_window_size > 0 else True)
    out = _attend(q.transpose(1, 2), *present, visible[:, None], scale, head_sink)
    return out.transpose(1, 2).reshape(batch, length, num_heads * width), *present


def _attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, scale: float,
            sinks: torch.Tensor | None) -> torch.Tensor:
    """Attention of ``query`` (``[B, heads, T, D]``) over the grouped ``keys``/``values`` (``[B, kv_heads, L, D]``)
    where ``visible``; with ``sinks``, one more softmax term per head of that logit (GPT-OSS's eager form, in
    float32)."""
    if sinks is None:
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=visible, scale=scale, enable_gqa=True)
    group = query.shape[1] // keys.shape[1]
    keys, values = (x.repeat_interleave(group, dim=1).float() for x in (keys, values))
    logits = (query.float() @ keys.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    sink = sinks.float().view(1, -1, 1, 1).expand(*logits.shape[:-1], 1)
    probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
    return (probs @ values).to(query.dtype)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x``'s last dimension RMS-normalized in float32 and scaled by ``weight`` (transformers' RMS norms)."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` (``[B, T, heads, D]``) rotated with its halves against each other (transformers' ``rotate_half``) by
    ``cos`` / ``sin`` (``[B, T, D / 2]``)."""
    first, second = x.chunk(2, dim=-1)
    cos, sin = cos[:, :, None], sin[:, :, None]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


@onnx_gqa.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache, head_sink, q_norm_weight,
      k_norm_weight, num_heads, kv_num_heads, scale, local_window_size, qk_norm_epsilon):
    return query.new_empty(query.shape), past_key.new_empty(past_key.shape), past_value.new_empty(past_value.shape)


def _translate(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache, head_sink,
               q_norm_weight, k_norm_weight, num_heads: int, kv_num_heads: int, scale: float, local_window_size: int,
               qk_norm_epsilon: float):
    """The ONNX for ``moe_fx::onnx_gqa``: onnxruntime's node itself (the inputs it does not use left empty, the
    trailing ones left out)."""
    from onnxscript.values import Op, Opset

    attributes = {"num_heads": num_heads, "kv_num_heads": kv_num_heads, "scale": float(scale)}
    if cos_cache is not None:
        attributes.update(do_rotary=1, rotary_interleaved=0)
    if local_window_size > 0:
        attributes.update(local_window_size=local_window_size)
    if q_norm_weight is not None:
        attributes.update(qk_norm_epsilon=float(qk_norm_epsilon))
    given = {"head_sink": head_sink, "q_norm_weight": q_norm_weight, "k_norm_weight": k_norm_weight}
    inputs = [query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache]
    inputs += [given.get(name) for name, _ in _OPTIONAL_INPUTS]
    while inputs[-1] is None:
        inputs.pop()
    return Op(Opset(DOMAIN, 1), OP, _schema())(*inputs, **attributes)


_OPTIONAL_INPUTS = (("position_ids", "U"), ("attention_bias", "U"), ("head_sink", "T"), ("k_scale", "U"), ("v_scale", "U"),
                    ("q_norm_weight", "T"), ("k_norm_weight", "T"))
"""The node's inputs after ``sin_cache`` up to the last the export uses, with their type constraints (onnxruntime
1.31's order)."""


@functools.cache
def _schema():
    """The node's schema as far as the export uses it (onnxscript's tracer builds nodes only for ops with one)."""
    from onnx.defs import OpSchema

    param = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    inputs = [param(name, "T") for name in ("query", "key", "value", "past_key", "past_value")]
    inputs += [param("seqlens_k", "M"), param("total_sequence_length", "M")]
    inputs += [param(name, "T", param_option=optional) for name in ("cos_cache", "sin_cache")]
    inputs += [param(name, kind, param_option=optional) for name, kind in _OPTIONAL_INPUTS]
    attr = OpSchema.AttrType
    attributes = [OpSchema.Attribute(name, kind, "") for name, kind in (
        ("num_heads", attr.INT), ("kv_num_heads", attr.INT), ("scale", attr.FLOAT), ("do_rotary", attr.INT), ("rotary_interleaved", attr.INT),
        ("local_window_size", attr.INT), ("qk_norm_epsilon", attr.FLOAT))]
    return OpSchema(OP, DOMAIN, 1, inputs=inputs, outputs=[param(name, "T") for name in ("output", "present_key", "present_value")],
                    type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""), ("M", ["tensor(int32)"], ""),
                                      ("U", ["tensor(int64)", "tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")],
                    attributes=attributes)


def _close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal up to the rounding of the dtype (float32: 1e-4, half: 2e-2, relative to the largest value)."""
    tol = (1e-4 if expected.dtype == torch.float32 else 2e-2) * max(1.0, float(expected.abs().max()))
    return got.shape == expected.shape and float((got.float() - expected.float()).abs().max()) <= tol


def _form(module: nn.Module, index: int, hidden: torch.Tensor, past: tuple, layer, output: torch.Tensor,
          caches: tuple[torch.Tensor, torch.Tensor] | None) -> _Projected | None:
    """The raw-projection form of a planned layer when the node's computation from the module's projections
    reproduces the module's output and cache update of the probe's step (``past``: the cache before it)."""
    if caches is None or caches[0].shape[-1] * 2 != past[0].shape[-1]:
        return None
    norms = _head_norms(module, past[0].shape[-1]) if _state["norms_in_node"] else None
    seqlens = _seqlens(past[2], hidden.shape[1], hidden.shape[0])
    for form in [_Projected(*caches, norms)] * (norms is not None) + [_Projected(*caches)]:  # with the norms in the node first
        got, keys, values = _projected(module, hidden, past[0], past[1], seqlens, form, _state["scales"][index], _state["softmax"][index])
        if _close(got, output) and _close(keys, layer.keys) and _close(values, layer.values):
            return form
    return None


def _cache_argument(kwargs: dict):
    """The cache an attention module is called with: ``past_key_values=`` (transformers 5.23) or ``cache=`` (5.25)."""
    return kwargs.get("past_key_values", kwargs.get("cache"))


def _probing(module: nn.Module, original, caches):
    """The module's forward during the probe: as it is, then its raw-projection form checked against what it did."""
    def forward(*args, **kwargs):
        hidden, cache = kwargs.get("hidden_states", args[0] if args else None), _cache_argument(kwargs)
        layer = cache.layers[module.layer_idx] if cache is not None else None
        ready = layer is not None and getattr(layer, "is_initialized", False)
        past = (layer.keys.clone(), layer.values.clone(), layer.cumulative_length.clone()) if ready else None
        out = original(*args, **kwargs)
        index = _state["calls"] - 1
        if past is not None and isinstance(hidden, torch.Tensor) and _state["plan"].get(index, "") is None:
            form = _form(module, index, hidden, past, layer, out[0], caches)
            if form is not None:
                _state["forms"][index] = form
        return out

    return forward


def _projected_forward(module: nn.Module, form: _Projected, scale: float, softmax: _Softmax):
    """The module's forward in the trace for a layer of raw-projection form: the cache's token count and the node."""
    def forward(*args, **kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        layer = _cache_argument(kwargs).layers[module.layer_idx]
        _state["calls"] += 1  # this layer's cache update, done by the node
        seqlens = _seqlens(layer.cumulative_length, hidden.shape[1], hidden.shape[0])
        layer.cumulative_length.add_(hidden.shape[1])
        out, layer.keys, layer.values = _projected(module, hidden, layer.keys, layer.values, seqlens, form, scale, softmax)
        return out, None

    return forward


@contextlib.contextmanager
def _restored(cache) -> Iterator[None]:
    """The static cache as it was on entry, after one decode step inside wrote a slot a layer (the probe's): the
    token counts and the slots at them are saved and put back, instead of a copy of the whole cache (gigabytes at
    full depth and a long cache)."""
    saved = []
    for layer in cache.layers:
        slot = int(layer.cumulative_length)
        saved.append((layer, layer.cumulative_length.clone(), slot, layer.keys[:, :, slot].clone(), layer.values[:, :, slot].clone()))
    try:
        yield
    finally:
        for layer, count, slot, keys, values in saved:
            layer.cumulative_length.copy_(count)
            layer.keys[:, :, slot] = keys
            layer.values[:, :, slot] = values


@contextlib.contextmanager
def _forwards(patches: dict[nn.Module, object]) -> Iterator[None]:
    """Each module's forward replaced (an instance attribute) while inside."""
    saved = {module: module.__dict__.get("forward") for module in patches}
    try:
        for module, forward in patches.items():
            module.forward = forward
        yield
    finally:
        for module, forward in saved.items():
            if forward is None:
                del module.forward
            else:
                module.forward = forward


@dataclass
class AttentionPlan:
    """What :func:`group_query_attention` planned: per layer index ``None`` (the node) or why not, and the layers whose
    node rotates q and k itself (:class:`_Projected`)."""

    layers: dict[int, str | None]
    rotary_in_node: list[int]
    norms_in_node: list[int]


@contextlib.contextmanager
def group_query_attention(model: nn.Module, inputs: dict, every_dtype: bool, norms_in_node: bool = False) -> Iterator[AttentionPlan]:
    """While inside (around the static export's trace, in place of :func:`~.static_decode.scatter_updates`):
    attention goes through :func:`_attention`, the cache layers update with :func:`_update`, layers of
    raw-projection form run :func:`_projected_forward`, and the exporter translates the op. On entry, one decode
    step of ``inputs`` (the trace's sample; what it writes is put back, :func:`_restored`) plans each layer;
    yields that plan. ``every_dtype``: fuse
    float32 layers too (onnxruntime's CPU kernel runs them; its CUDA kernel does not). ``norms_in_node``: the node
    also applies per-head q/k norms where the layer has them (a graph for onnxruntime's CUDA kernel only)."""
    from transformers import AttentionInterface
    from transformers.exporters import exporter_onnx
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    table = getattr(exporter_onnx, "_ONNX_TRANSLATION_TABLE", None)
    if not isinstance(table, dict):
        import transformers

        raise MoeFxError(f"transformers {transformers.__version__}'s ONNX exporter takes no translation table, so the attention node "
                         "cannot be emitted: export with --attention plain")
    config = model.config
    before = config._attn_implementation
    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS[before])
    key = torch.ops.moe_fx.onnx_gqa.default
    modules = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)
               and all(isinstance(getattr(m, name, None), nn.Linear) for name in _PROJECTIONS)]
    cache = inputs["past_key_values"].layers[0].keys
    caches = _rotary_caches(model, cache.shape[2], cache.shape[3])
    _state.update(implementation=before, calls=0, plan={}, forms={}, scales={}, softmax={}, every_dtype=every_dtype,
                  norms_in_node=norms_in_node, probing=True)
    try:
        config._attn_implementation = NAME
        with cache_updates(_update), torch.no_grad():
            with _forwards({m: _probing(m, m.forward, caches) for m in modules}):
                with _restored(inputs["past_key_values"]):
                    model(**inputs)
            if len(_state["plan"]) != _state["calls"]:
                raise MoeFxError(f"{_state['calls']} cache updates but {len(_state['plan'])} attention calls in a decode step; "
                                 "export with --attention plain")
            _state.update(calls=0, probing=False)
            by_layer = {m.layer_idx: m for m in modules}
            patches = {by_layer[i]: _projected_forward(by_layer[i], form, _state["scales"][i], _state["softmax"][i])
                       for i, form in _state["forms"].items()}
            table[key] = _translate
            with _forwards(patches):
                yield AttentionPlan(dict(_state["plan"]), sorted(_state["forms"]),
                                    sorted(i for i, form in _state["forms"].items() if form.norms is not None))
    finally:
        config._attn_implementation = before
        table.pop(key, None)
        _pending.clear()
