"""Static-shape decode graphs: one token per step, a fixed batch, and a KV cache of fixed length updated in place.

Why: onnxruntime replays a graph as one CUDA graph (``enable_cuda_graph``) only when every node runs on the CUDA
provider and every shape is fixed. The dynamic export (batch, sequence and past length free) computes shapes with
small ops onnxruntime keeps on the CPU, so its decode step is ~500 separate kernel launches (2.5-2.9 ms for 4
layers of Qwen3-30B-A3B shapes, where PyTorch with CUDA graphs takes 0.7). A static graph has no shape
computations at all.

The graph is traced over transformers' ``StaticCache`` whose layers write the new token's keys and values with a
``scatter`` on the sequence axis (stock layers use ``index_copy_``, which exports as transpose, ``ScatterND``,
transpose: two extra copies of the whole cache per layer). Its interface:

- in: ``input_ids`` ``[B, 1]``, ``attention_mask`` ``[B, L]`` (1 where a slot holds a real token, the new one
  included), ``position_ids`` ``[B, 1]``, ``cache_position`` ``[1]`` (the slot the new token is written to),
  ``past_key_values.{i}.key|value`` ``[B, H, L, D]``;
- out: ``logits`` ``[B, 1, V]``, ``present.{i}.key|value``: the past with the slot written. Each present is a
  ``ScatterElements`` of its past, so a runner may bind both to the same buffer (the update is then in place:
  :mod:`.decoder`).

Prefill runs through the same graph one token at a time (:class:`~moe_fx.deliver.onnx.runtime.OnnxCausalLM`),
or through a dynamic export of the same model. Optimum's ``ORTModelForCausalLM`` expects the dynamic layout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers.cache_utils import StaticLayer

from moe_fx.deliver.static_cache import UnfilledWindowLayer, static_cache
from moe_fx.errors import BadOptionError, MoeFxError

STATIC_INPUTS = ("input_ids", "attention_mask", "position_ids", "cache_position")
MIN_CACHE_LEN = 32
"""The parity check writes a 12-token prompt and 16 generated tokens into the cache."""
_COUNT = "cumulative_length"
"""The per-layer token count transformers' static layers carry; in the graph it equals ``cache_position``."""


@dataclass(frozen=True)
class StaticShape:
    """The fixed sizes of a static decode graph."""

    batch_size: int
    max_cache_len: int

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise BadOptionError(f"--batch-size {self.batch_size}: a static decode graph needs a batch of at least 1")
        if self.max_cache_len < MIN_CACHE_LEN:
            raise BadOptionError(f"--static-cache {self.max_cache_len} is too short: the parity check needs at least {MIN_CACHE_LEN} "
                                 "slots; use the longest prompt plus new tokens you will run (e.g. 2048)")

    def to_dict(self) -> dict:
        return asdict(self)


def scatter_update(layer: StaticLayer, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``StaticLayer.update`` writing with ``scatter_`` on the sequence axis (exports as one ``ScatterElements``)."""
    if not layer.is_initialized:
        layer.lazy_initialization(key_states, value_states)
    length = key_states.shape[-2]
    slots = (torch.arange(length, device=key_states.device) + layer.cumulative_length).view(1, 1, length, 1)
    layer.cumulative_length.add_(length)
    layer.keys.scatter_(2, slots.expand(key_states.shape), key_states)
    layer.values.scatter_(2, slots.expand(value_states.shape), value_states)
    return layer.keys, layer.values


_SCATTERABLE = (StaticLayer, UnfilledWindowLayer)
"""Layers whose update writes at the tensor count (a sliding window's layer is one of them here: it holds every slot
of the cache, the window being the mask's, since a graph cannot roll it)."""


@contextlib.contextmanager
def cache_updates(update) -> Iterator[None]:
    """While active, the static layers update with ``update`` (patched on the classes, restored on exit: the exporter
    flattens the cache's instances, which must hold no functions)."""
    saved = {cls: cls.__dict__["update"] for cls in _SCATTERABLE}
    try:
        for cls in _SCATTERABLE:
            cls.update = update
        yield
    finally:
        for cls, saved_update in saved.items():
            cls.update = saved_update


def scatter_updates() -> contextlib.AbstractContextManager[None]:
    """While active, the static layers update with :func:`scatter_update`."""
    return cache_updates(scatter_update)


def static_sample_inputs(model: nn.Module, shape: StaticShape) -> dict:
    """A one-token decode step over an initialized static cache: what the static graph is traced with (inside
    :func:`scatter_updates`)."""
    try:
        cache = static_cache(model.config, shape.max_cache_len, full_windows=True)
    except (ValueError, TypeError, AttributeError) as exc:
        raise BadOptionError(f"{type(model).__name__} has no transformers StaticCache ({exc}); export without --static-cache") from None
    for i, layer in enumerate(cache.layers):
        if type(layer) in _SCATTERABLE:
            continue
        raise BadOptionError(f"layer {i}'s cache ({type(layer).__name__}) is not a fixed-slot key/value cache a static graph can write; "
                             "export without --static-cache")
    vocab = model.get_output_embeddings().weight.shape[0]
    device = next(model.parameters()).device
    prompt = 5
    ids = torch.randint(3, min(vocab, 32000), (shape.batch_size, prompt + 1), generator=torch.Generator().manual_seed(0)).to(device)
    model(ids[:, :prompt], past_key_values=cache, use_cache=True)  # allocates the cache's tensors
    mask = torch.zeros(shape.batch_size, shape.max_cache_len, dtype=torch.long, device=device)
    mask[:, : prompt + 1] = 1
    return {
        "input_ids": ids[:, prompt:],
        "attention_mask": mask,
        "position_ids": torch.full((shape.batch_size, 1), prompt, device=device),
        "past_key_values": cache,
        "cache_position": torch.tensor([prompt], device=device),
        "use_cache": True,
    }


def fold_token_counts(graph) -> None:
    """Feed every layer's ``cumulative_length`` input from ``cache_position`` (they are equal at every step) and drop
    the counts among the outputs (and the nodes that computed them)."""
    import onnx_ir as ir

    counts = [v for v in graph.inputs if (v.name or "").endswith(f".{_COUNT}")]
    if not counts:
        return
    position = next((v for v in graph.inputs if v.name == "cache_position"), None)
    if position is None:
        raise MoeFxError("the static graph has no cache_position input to feed the cache's token counts from; please report the model family")
    axes = ir.tensor([0], dtype=ir.DataType.INT64, name="cache_position_axes")
    axes_value = ir.Value(name=axes.name, shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.INT64), const_value=axes)
    graph.register_initializer(axes_value)
    node = ir.node("Squeeze", inputs=[position, axes_value], name="cache_position_scalar")
    graph.insert_before(graph.node(0), node)
    node.outputs[0].name, node.outputs[0].dtype, node.outputs[0].shape = "cache_position_scalar", position.dtype, ir.Shape([])
    for value in counts:
        value.replace_all_uses_with(node.outputs[0])
        graph.inputs.remove(value)
    for value in [v for v in graph.outputs if (v.name or "").endswith(f".{_COUNT}")]:
        graph.outputs.remove(value)
