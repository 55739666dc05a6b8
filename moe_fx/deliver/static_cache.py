"""``moe_fx.static_cache``: a transformers ``StaticCache`` whose compiled decode does not recompile at every token.

Why: transformers' static cache layer for sliding-window and chunked attention (``StaticSlidingWindowLayer``:
Llama 4's chunked layers, GPT-OSS's sliding ones, Gemma, Mistral, ...) counts the tokens it has seen in a Python
``int`` and reads it for the attention mask's offsets and its update's branches. ``torch.compile`` guards on the
exact value of that int, so a decode step of ``moe_fx.compile(model, dynamic=False)`` (or with CUDA graphs)
recompiles at every token until the recompile limit stops it (transformers keeps the int by design,
huggingface/transformers#44609). Full-attention layers count in a tensor and compile once.

What, per sliding-window layer:

- The cache is no longer than the window (``max_cache_len <= sliding_window``, e.g. any decode under Llama 4's
  8,192-token chunks): the window can never fill, so the layer never rolls. It is then exactly a full static
  layer (keys written at the tensor position, the whole cache masked by the window's mask function), and
  :class:`UnfilledWindowLayer` runs it as one, counting in the tensor only.
- The cache can outgrow the window (GPT-OSS's 128 tokens in a longer cache), with ``rolling_windows=True``
  (opt-in, see below): :class:`RollingWindowLayer` keeps
  the stock layer's layout (the window's tokens in order, the newest last, rolled once full) but runs a
  one-token step on the tensor count alone: it writes at ``min(count, window - 1)``, rolls first where
  ``count >= window`` (a ``torch.where``, no branch), and while compiled gives the mask its offset
  ``max(count - window + 1, 0)`` as a tensor. Steps of several tokens (prefill, eager) take the stock code with
  its int set from the tensor.

Masks, keys and values are the stock layer's (tested: equal logits, one compile for every later token).

Why rolling windows are opt-in: given a 2-D ``attention_mask`` (``generate`` passes one), transformers compares
the mask offset with the mask's length in Python (``prepare_padding_mask``); a tensor offset makes that a
data-dependent branch, which ``fullgraph`` compiling refuses, where the stock layer's int recompiles (once,
under automatic dynamic shapes; at every token with ``dynamic=False``). Decode that passes ``cache_position``
and no 2-D mask (a hand-written loop, ``benchmarks/decode.py``) compiles once with it.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PretrainedConfig, StaticCache
from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

__all__ = ["RollingWindowLayer", "UnfilledWindowLayer", "static_cache"]


class UnfilledWindowLayer(StaticSlidingWindowLayer):
    """A sliding-window layer whose cache is no longer than its window (or holds every slot of the cache,
    ``full_windows``), run as a full static layer: writes at the tensor count, constant mask sizes, the tensor as its
    length (no Python int is read while compiled); the window's mask function masks what the window leaves out."""

    update = StaticLayer.update
    get_mask_sizes = StaticLayer.get_mask_sizes
    get_seq_length = StaticLayer.get_seq_length


class RollingWindowLayer(StaticSlidingWindowLayer):
    """A sliding-window layer the cache can outgrow, whose one-token steps read only its tensor count (module doc)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[-2] != 1:
            # several tokens (prefill): the stock branches, on an int synced with the tensor both ways
            self.cumulative_length_int = int(self.cumulative_length)
            states = StaticSlidingWindowLayer.update(self, key_states, value_states, *args, **kwargs)
            self.cumulative_length.fill_(self.cumulative_length_int)
            return states
        count = self.cumulative_length
        window = self.max_cache_len
        slot = count.clamp(max=window - 1).reshape(1)
        for cached, new in ((self.keys, key_states), (self.values, value_states)):
            # once full, the oldest token leaves on the left and the new one takes the last slot, as in the stock layer
            shifted = torch.where(count >= window, cached.roll(-1, dims=-2), cached)
            cached.copy_(shifted.index_copy(2, slot, new))
        self.cumulative_length.add_(1)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int | torch.Tensor]:
        if query_length == 1 and torch.compiler.is_compiling():
            # the stock sizes of a one-token step (full or not, the window's slots), the offset as a tensor
            return self.max_cache_len, (self.cumulative_length - self.max_cache_len + 1).clamp(min=0)
        self.cumulative_length_int = int(self.cumulative_length)  # a tensor from construction on, 0 until the first update
        return StaticSlidingWindowLayer.get_mask_sizes(self, query_length)

    def get_seq_length(self) -> int | torch.Tensor:
        return StaticLayer.get_seq_length(self)


def static_cache(config: PretrainedConfig, max_cache_len: int, *, rolling_windows: bool = False, full_windows: bool = False,
                 **kwargs: Any) -> StaticCache:
    """``StaticCache(config=config, max_cache_len=max_cache_len, **kwargs)`` whose sliding-window layers that the
    cache cannot outgrow run as :class:`UnfilledWindowLayer`, and, with ``rolling_windows`` (decode without a
    2-D attention mask, module doc), the others as :class:`RollingWindowLayer`: ``moe_fx.compile``d decode
    then compiles once. ``full_windows``: every sliding-window layer holds all ``max_cache_len`` slots and runs as
    :class:`UnfilledWindowLayer`, the window applied by the mask alone (what a static ONNX graph needs: it cannot
    roll, and onnxruntime's attention node takes the window as ``local_window_size`` over a full cache); the
    window's layers then take as much memory as full-attention ones."""
    cache = StaticCache(config=config, max_cache_len=max_cache_len, **kwargs)
    for layer in cache.layers:
        if type(layer) is not StaticSlidingWindowLayer:
            continue
        # the stock layer keeps min(window, max_cache_len) slots: equal to the cache length iff the window cannot fill
        if layer.max_cache_len >= max_cache_len or full_windows:
            layer.max_cache_len = max_cache_len  # allocated on the first update
            layer.__class__ = UnfilledWindowLayer
        elif rolling_windows:
            layer.__class__ = RollingWindowLayer
    return cache
