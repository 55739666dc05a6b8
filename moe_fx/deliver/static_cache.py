"""``moe_fx.static_cache``: a transformers ``StaticCache`` whose compiled decode does not recompile at every token.

Why: transformers' static cache layer for sliding-window and chunked attention (``StaticSlidingWindowLayer``:
Llama 4's chunked layers, GPT-OSS's sliding ones, Gemma, Mistral, ...) counts the tokens it has seen in a Python
``int`` and reads it for the attention mask's offsets and its update's branches. ``torch.compile`` guards on the
exact value of that int, so a decode step of ``moe_fx.compile(model, dynamic=False)`` (or with CUDA graphs)
recompiles at every token until the recompile limit stops it (transformers keeps the int by design,
huggingface/transformers#44609). Full-attention layers count in a tensor and compile once.

What: where the cache is no longer than the layer's window (``max_cache_len <= sliding_window``, e.g. any decode
under Llama 4's 8,192-token chunks), the window can never fill, so the layer never rolls: it is then exactly a
full static layer (keys written at the tensor position, the whole cache masked by the window's mask function),
and :class:`UnfilledWindowLayer` runs it as one, counting in the tensor only. Layers whose window the cache can
outgrow (GPT-OSS's 128 tokens in a longer cache) are left as transformers made them; their compiled decode
still recompiles at every token once the window is full. Masks, keys and values are the stock layer's (tested:
equal logits, one compile for every later token).
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig, StaticCache
from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

__all__ = ["UnfilledWindowLayer", "static_cache"]


class UnfilledWindowLayer(StaticSlidingWindowLayer):
    """A sliding-window layer whose cache is no longer than its window, run as a full static layer: writes at the
    tensor count, constant mask sizes, the tensor as its length (no Python int is read while compiled)."""

    update = StaticLayer.update
    get_mask_sizes = StaticLayer.get_mask_sizes
    get_seq_length = StaticLayer.get_seq_length


def static_cache(config: PretrainedConfig, max_cache_len: int, **kwargs: Any) -> StaticCache:
    """``StaticCache(config=config, max_cache_len=max_cache_len, **kwargs)`` whose sliding-window layers that the
    cache cannot outgrow run as :class:`UnfilledWindowLayer`, so ``moe_fx.compile``d decode compiles once."""
    cache = StaticCache(config=config, max_cache_len=max_cache_len, **kwargs)
    for layer in cache.layers:
        # the stock layer keeps min(window, max_cache_len) slots: equal to the cache length iff the window cannot fill
        if type(layer) is StaticSlidingWindowLayer and layer.max_cache_len >= max_cache_len:
            layer.__class__ = UnfilledWindowLayer
    return cache
