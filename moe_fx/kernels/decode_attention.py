"""``moe_fx::decode_attention``: a decode step's attention (one query token per row) as one small kernel (CUDA,
Triton), swapped in for ``scaled_dot_product_attention`` in graphs :func:`moe_fx.compile` captures.

A compiled static-cache decode step at batch 1 spent 9.4 us a layer in attention on an H100 (Qwen3-30B-A3B
shapes, 152 cache slots): cuDNN's kernel (6.7 us) and two Inductor kernels around it (the boolean mask made
additive, the query laid out for cuDNN), for about 0.3 MB of keys and values. SDPA's flash and memory-efficient
kernels refuse the static cache's boolean mask with grouped-query heads. The kernel here
(:mod:`.triton_attention`) reads the query, cache and mask where they are, runs every query head of a
grouped-query group in one program, pipelines the loads of a block's keys, values and mask, and splits long
caches across programs.
Its results differ from SDPA's by rounding (the order of the softmax's sums; probabilities rounded to the
cache's dtype before the value product, as flash attention does)."""

from __future__ import annotations

import operator

import torch
from torch import fx

from moe_fx.kernels import grouped_mm
from moe_fx.kernels.topk import bound_args, example_value, replace_call

MAX_HEAD_DIM = 256
"""Widest query/key and value head the kernel holds in registers (families use 64-192)."""
MAX_GROUP = 64
"""Most query heads per key/value head (one program holds them all)."""
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPAS = (torch.nn.functional.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """SDPA of ``q [B, Hq, 1, Dk]`` over ``k``/``v [B, Hkv, L, D]`` with ``mask`` ``None`` or ``[B | 1, 1, 1, L]``."""
    from moe_fx.kernels.triton_attention import triton_decode_attention

    return triton_decode_attention(q, k, v, None if mask is None else mask[:, 0, 0, :], scale)


decode_attention = grouped_mm.triton_op("moe_fx::decode_attention", _decode_attention)


def eligible(q: object, k: object, v: object, mask: object, dropout: object, causal: object, gqa: object) -> bool:
    """Whether an SDPA call with these (fake) tensors and arguments can run on the kernel: floating CUDA tensors,
    one query per row, ``Hq`` a multiple of ``Hkv`` (equal unless ``enable_gqa``), heads of at most
    :data:`MAX_HEAD_DIM` with contiguous last dimensions, no dropout, no ``is_causal`` (with one query it would
    attend to the first slot only), and a mask of one row per batch row (or none): boolean or in the query's dtype."""
    tensors = (q, k, v)
    if not all(isinstance(t, torch.Tensor) and t.ndim == 4 and t.device.type == "cuda" for t in tensors) or not grouped_mm.triton_available():
        return False
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    (batch, hq, queries, dk), (hkv, length) = q.shape, k.shape[1:3]
    shapes = all(isinstance(d, int) for t in tensors for d in t.shape)
    if not shapes or queries != 1 or k.shape[0] != batch or v.shape[:3] != k.shape[:3] or k.shape[-1] != dk:
        return False
    if hq % hkv or hq // hkv > MAX_GROUP or (hq != hkv and gqa is not True) or max(dk, v.shape[-1]) > MAX_HEAD_DIM:
        return False
    if any(t.stride(-1) != 1 for t in tensors) or dropout not in (0, 0.0) or causal not in (False, None) or length == 0:
        return False
    if mask is None:
        return True
    return (isinstance(mask, torch.Tensor) and mask.ndim == 4 and tuple(mask.shape[1:]) == (1, 1, length)
            and mask.shape[0] in (1, batch) and mask.dtype in (torch.bool, q.dtype) and mask.device == q.device)


_NEW_DIM_2 = (slice(None), slice(None), None, slice(None), slice(None))


def _repeated_from(node: object) -> fx.Node | None:
    """The ``[B, Hkv, L, D]`` cache that ``node`` repeats per query head, where ``node`` is transformers'
    ``repeat_kv`` (``x[:, :, None].expand(B, Hkv, n, L, D).reshape(B, Hkv * n, L, D)``); else ``None``."""
    if not (isinstance(node, fx.Node) and node.op == "call_method" and node.target == "reshape"):
        return None
    expand = node.args[0]
    if not (isinstance(expand, fx.Node) and expand.op == "call_method" and expand.target == "expand"):
        return None
    inserted = expand.args[0]
    if not (isinstance(inserted, fx.Node) and inserted.op == "call_function" and inserted.target is operator.getitem
            and inserted.args[1] == _NEW_DIM_2):
        return None
    source, out, wide = inserted.args[0], example_value(node), example_value(expand)
    value = example_value(source)
    if value is None or out is None or wide is None or value.ndim != 4 or wide.ndim != 5:
        return None
    batch, heads, length, dim = value.shape
    if tuple(wide.shape) != (batch, heads, wide.shape[2], length, dim) or tuple(out.shape) != (batch, heads * wide.shape[2], length, dim):
        return None
    return source


def _erase_unused_chain(gm: fx.GraphModule, reshape: fx.Node) -> None:
    """Erase ``repeat_kv``'s reshape, expand and indexing (:func:`_repeated_from`), each where nothing else reads it;
    never what they read (the cache, or the write that made it)."""
    expand = reshape.args[0]
    inserted = expand.args[0]
    for node in (reshape, expand, inserted):
        if node.users:
            return
        gm.graph.erase_node(node)


def replace_decode_attention(gm: fx.GraphModule) -> int:
    """Replace every eligible ``scaled_dot_product_attention`` call of a Dynamo graph by ``moe_fx::decode_attention``
    (the example values Dynamo records say which are: decode steps on CUDA). Where transformers repeated the cache
    per query head first (``repeat_kv``: without ``TRANSFORMERS_SDPA_FORCE_GQA``, a copy of the whole cache in every
    layer and step), the kernel reads the cache itself with its grouped heads and the copy leaves the graph.
    Returns how many calls were replaced."""
    replaced = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _SDPAS:
            continue
        bound = bound_args(node, _SDPA_ARGS)
        q, k, v, mask = (bound.get(name) for name in ("query", "key", "value", "attn_mask"))
        if set(bound) - set(_SDPA_ARGS) or not (mask is None or isinstance(mask, fx.Node)):
            continue
        gqa, repeats = bound.get("enable_gqa", False), ()
        k_cache, v_cache = _repeated_from(k), _repeated_from(v)
        if k_cache is not None and v_cache is not None and example_value(k_cache).shape[1] == example_value(v_cache).shape[1]:
            (k, v), repeats, gqa = (k_cache, v_cache), (k, v), True  # the kernel reads each key/value head once for its group
        if not eligible(example_value(q), example_value(k), example_value(v), example_value(mask) if mask is not None else None,
                        bound.get("dropout_p", 0.0), bound.get("is_causal", False), gqa):
            continue
        scale = bound.get("scale")
        if scale is None:
            scale = example_value(q).shape[-1] ** -0.5
        if not isinstance(scale, float | int):
            continue
        replace_call(gm, node, torch.ops.moe_fx.decode_attention.default, (q, k, v, mask, float(scale)))
        for repeat in repeats:  # the copies of the cache per query head, now read by nothing
            _erase_unused_chain(gm, repeat)
        replaced += 1
    if replaced:
        gm.graph.lint()
        gm.recompile()
    return replaced
