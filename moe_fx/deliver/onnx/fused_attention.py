"""A static decode graph's attention as one onnxruntime ``com.microsoft.GroupQueryAttention`` node per layer.

Why: profiled on an H100 (``docs/benchmarks/speed.md``), a replayed static step of 4 Qwen3-30B-A3B layers spent
101 us of its 846 us of kernels at batch 1 in attention, and 255 of 1,958 at batch 16: the opset-23 ``Attention`` op
runs five kernels a layer (the kernel, masked-row zeroing, the key/value heads repeated to the query heads,
transposes), and the cache update is one ``ScatterElements`` per tensor. onnxruntime's ``GroupQueryAttention``
writes the new token's keys and values into the cache and attends over it in one node, reading the grouped
key/value heads as they are (what onnxruntime-genai's model builder emits).

How (:func:`group_query_attention`, around the static export's trace): first one decode step of a copy of the
trace's sample, through the model's own attention, plans each layer: the node where the attention reads the very
tensors the cache update returned (MLA's reads keys expanded from a compressed cache instead) and nothing below
rules it out. Then, in the trace, a planned layer's cache update keeps the new token's keys and values aside
instead of writing them, and the attention call that follows hands them, the query and the layer's cache to
``moe_fx::onnx_gqa``, which the exporter translates into the node; its present outputs become the layer's cache,
returned as ``present.{i}.key|value``. The node writes the token at slot ``seqlens_k`` (the ``cache_position``
input, the same for every row) and attends to slots ``0..seqlens_k``; bound to one buffer with its past (the
runners' IO binding), the write is in place.

What it cannot express stays on the model's own attention, layer by layer, with the reason recorded:
attention sinks (GPT-OSS), sliding windows, logit soft-capping, key and value heads of different widths (MLA).
The node has no padding mask: every row of a batch holds the same number of tokens, so when every layer is
fused the graph has no ``attention_mask`` input and the runners refuse a mask with padding in it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import sys
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import StaticLayer

from moe_fx.deliver.onnx.static_decode import cache_updates, scatter_update
from moe_fx.errors import MoeFxError

NAME = "moe_fx_onnx_gqa"
"""The attention implementation the static export traces with when attention is fused."""
ATTENTIONS = ("gqa", "plain")
"""``--attention``: onnxruntime's GroupQueryAttention node per layer, or the model's own attention ops."""
DOMAIN, OP = "com.microsoft", "GroupQueryAttention"
HALF_DTYPES = (torch.float16, torch.bfloat16)
"""The dtypes onnxruntime's CUDA GroupQueryAttention kernel runs (its CPU kernel also runs float32)."""

_state: dict = {"implementation": "sdpa", "calls": 0, "plan": {}, "every_dtype": False, "probing": False}
"""The pass in progress: the model's attention implementation, cache updates so far in this forward, the
per-layer plan (``None``: the node; else why not), fuse float32 layers too, and whether it is the probe."""
_pending: list = []
"""The cache update the next attention call consumes: ``[keys, values, seqlens_k, layer]`` (the node's layers), or
``[keys returned, values returned]`` (the probe)."""


def _unsupported(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kwargs: dict) -> str | None:
    """Why the node cannot compute this layer's attention, or ``None``."""
    if isinstance(getattr(module, "sinks", None), torch.Tensor) or kwargs.get("s_aux") is not None:
        return "attention sinks"
    if kwargs.get("sliding_window") is not None or getattr(module, "sliding_window", None) is not None:
        return "a sliding window"
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
    return None


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
            _pending[:] = [keys, values]
        return keys, values
    if not layer.is_initialized:
        layer.lazy_initialization(key_states, value_states)
    length = key_states.shape[-2]
    seqlens = (layer.cumulative_length + (length - 1)).to(torch.int32).expand(key_states.shape[0])
    layer.cumulative_length.add_(length)
    _pending[:] = [key_states, value_states, seqlens, layer]
    return key_states, value_states


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
               scaling: float | None = None, dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature (query ``[B, heads, T, D]``; the output ``[B, T, heads, D]``). The
    probe plans the layer: the node when the attention reads the cache the update returned (MLA's attention reads
    keys expanded from a compressed cache instead) and :func:`_unsupported` finds nothing; the trace follows the plan."""
    index = _state["calls"] - 1
    if _state["probing"]:
        reads_cache = len(_pending) == 2 and key is _pending[0] and value is _pending[1]
        _state["plan"][index] = _unsupported(module, query, key, value, kwargs) if reads_cache else \
            "the attention reads keys and values derived from the cache, not the cache (MLA)"
    elif len(_pending) == 4:
        new_key, new_value, seqlens, layer = _pending
        _pending.clear()
        if key is not new_key or value is not new_value:
            raise MoeFxError(f"layer {index}'s attention did not read the cache update the probe saw; export with --attention plain")
        batch, heads, length, width = query.shape
        flat = [x.transpose(1, 2).reshape(batch, length, -1) for x in (query, new_key, new_value)]
        total = torch.tensor(layer.keys.shape[2], dtype=torch.int32)
        scale = scaling if scaling is not None else width ** -0.5
        out, layer.keys, layer.values = torch.ops.moe_fx.onnx_gqa(*flat, layer.keys, layer.values, seqlens, total, heads, key.shape[1], float(scale))
        return out.view(batch, length, heads, width), None
    return _plain_attention(module)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


@torch.library.custom_op("moe_fx::onnx_gqa", mutates_args=())
def onnx_gqa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
             seqlens_k: torch.Tensor, total_sequence_length: torch.Tensor, num_heads: int, kv_num_heads: int,
             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What ``GroupQueryAttention`` computes over a cache shared with its output: the ``T`` new tokens' keys and
    values (``[B, T, kv_heads * D]``) written at slots ``seqlens_k - T + 1 .. seqlens_k`` of ``past_*``
    (``[B, kv_heads, L, D]``), each query attending causally to the slots up to its own. Eager only for the
    export's sample run; the graph gets the operator."""
    batch, length, _ = query.shape
    width = past_key.shape[-1]
    slots = (seqlens_k.long() + 1 - length)[:, None] + torch.arange(length, device=query.device)  # [B, T]
    index = slots[:, None, :, None].expand(batch, kv_num_heads, length, width)
    present = [past.scatter(2, index, new.view(batch, length, kv_num_heads, width).transpose(1, 2))
               for past, new in ((past_key, key), (past_value, value))]
    visible = torch.arange(past_key.shape[2], device=query.device)[None, None, :] <= slots[:, :, None]  # [B, T, L]
    q = query.view(batch, length, num_heads, width).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, *present, attn_mask=visible[:, None], scale=scale, enable_gqa=True)
    return out.transpose(1, 2).reshape(batch, length, num_heads * width), *present


@onnx_gqa.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, num_heads, kv_num_heads, scale):
    return query.new_empty(query.shape), past_key.new_empty(past_key.shape), past_value.new_empty(past_value.shape)


def _translate(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, num_heads: int, kv_num_heads: int, scale: float):
    """The ONNX for ``moe_fx::onnx_gqa``: onnxruntime's node itself."""
    from onnxscript.values import Op, Opset

    return Op(Opset(DOMAIN, 1), OP, _schema())(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
                                              num_heads=num_heads, kv_num_heads=kv_num_heads, scale=float(scale))


@functools.cache
def _schema():
    """The node's schema as far as the export uses it (onnxscript's tracer builds nodes only for ops with one)."""
    from onnx.defs import OpSchema

    param = OpSchema.FormalParameter
    inputs = [param(name, "T") for name in ("query", "key", "value", "past_key", "past_value")]
    inputs += [param("seqlens_k", "M"), param("total_sequence_length", "M")]
    attr = OpSchema.AttrType
    attributes = [OpSchema.Attribute("num_heads", attr.INT, ""), OpSchema.Attribute("kv_num_heads", attr.INT, ""),
                  OpSchema.Attribute("scale", attr.FLOAT, "")]
    return OpSchema(OP, DOMAIN, 1, inputs=inputs, outputs=[param(name, "T") for name in ("output", "present_key", "present_value")],
                    type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""), ("M", ["tensor(int32)"], "")],
                    attributes=attributes)


@contextlib.contextmanager
def group_query_attention(model: nn.Module, inputs: dict, every_dtype: bool) -> Iterator[dict[int, str | None]]:
    """While inside (around the static export's trace, in place of :func:`~.static_decode.scatter_updates`):
    attention goes through :func:`_attention`, the cache layers update with :func:`_update`, and the exporter
    translates the op. On entry, one decode step of a copy of ``inputs`` (the trace's sample) plans each layer;
    yields that plan (layer index -> ``None`` for the node, else why not). ``every_dtype``: fuse float32 layers
    too (onnxruntime's CPU kernel runs them; its CUDA kernel does not)."""
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
    _state.update(implementation=before, calls=0, plan={}, every_dtype=every_dtype, probing=True)
    try:
        config._attn_implementation = NAME
        with cache_updates(_update), torch.no_grad():
            model(**copy.deepcopy(inputs))
            if len(_state["plan"]) != _state["calls"]:
                raise MoeFxError(f"{_state['calls']} cache updates but {len(_state['plan'])} attention calls in a decode step; "
                                 "export with --attention plain")
            _state.update(calls=0, probing=False)
            table[key] = _translate
            yield dict(_state["plan"])
    finally:
        config._attn_implementation = before
        table.pop(key, None)
        _pending.clear()
