"""Run a causal LM one decoder layer at a time: find its layers, and capture what the model passes to each.

A model's forward prepares the layers' inputs before the layer loop: the embedded tokens, the rotary
position embeddings, the causal (or sliding-window) masks chosen per layer, position ids. Rather than
re-implement that per family, :func:`capture_layer_calls` runs the model's own forward with every decoder
layer replaced by a recorder that keeps its arguments and returns its input unchanged, and stops at the last
layer. The layers may be on ``meta`` meanwhile: none of them runs. Then ``layer(hidden, *args, **kwargs)``
reproduces, layer by layer, the full forward. Two kinds of state pass between layers beside the hidden states,
and belong to one batch of windows: outputs a layer hands to the next (``MoEModelSpec.layer_carry``: GLM-5's and
Mistral-Large-4's sparse-attention indices; the stand-ins return the same tuple, with None for them), and mutable
containers the model passes to every layer (Mistral-Large-4's ``shared_kv_states``, which a layer fills and a
later one reads). :func:`capture_layer_calls` returns both as the batch's own keyword arguments, which
:class:`LayerCall` applies over the captured ones and updates.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass

import torch
from torch import nn

from moe_fx.errors import UnsupportedFamilyError
from moe_fx.model.spec import MoEModelSpec


def stand_in_output(hidden: torch.Tensor, carry: tuple[str, ...] = ()):
    """What a decoder layer standing in for the real one returns: ``hidden``, followed by None for each output the
    next layer takes (``carry``), so the model's layer loop unpacks it as it unpacks the real layer's."""
    return (hidden, *([None] * len(carry))) if carry else hidden


@dataclass
class LayerCall:
    """The arguments the model passes to one decoder layer, besides its hidden states; ``carry``: the keyword
    arguments it takes from the previous layer's extra outputs."""

    args: tuple
    kwargs: dict
    carry: tuple[str, ...] = ()

    def __call__(self, layer: nn.Module, hidden: torch.Tensor, own: dict | None = None) -> torch.Tensor:
        """The layer's output hidden states. ``own``: the batch's own keyword arguments (from
        :func:`capture_layer_calls`), applied over the captured ones and updated with what this layer hands on."""
        own = {} if own is None else own
        out = layer(hidden, *self.args, **{**self.kwargs, **own})
        if not isinstance(out, tuple):
            return out
        own.update(zip(self.carry, out[1 : 1 + len(self.carry)]))
        return out[0]


def decoder_layers(model: nn.Module, spec: MoEModelSpec) -> tuple[str, nn.ModuleList]:
    """The module path and ModuleList of ``model``'s decoder layers: the list holding the layer of the first
    MoE block (``model.layers``, ``model.language_model.layers``, ...)."""
    path = spec.blocks[0].path.split(".")
    for cut in range(len(path) - 1, 0, -1):
        prefix = ".".join(path[:cut])
        module = model.get_submodule(prefix)
        if isinstance(module, nn.ModuleList) and len(module) == spec.num_layers:
            return prefix, module
    raise UnsupportedFamilyError(f"no list of {spec.num_layers} decoder layers holds {spec.blocks[0].path}; streaming cannot run this model")


class _Captured(Exception):
    """Raised by the last layer's recorder: the forward has prepared every layer's call."""


def capture_layer_calls(
    model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor, carry: tuple[str, ...] = ()
) -> tuple[torch.Tensor, list[LayerCall], dict]:
    """The first layer's hidden states for ``input_ids``, every layer's call, from the model's own forward, and the
    batch's own keyword arguments (its mutable containers; see the module doc); ``carry``: the spec's ``layer_carry``."""
    calls: list[LayerCall] = []
    first: list[torch.Tensor] = []

    def recorder(index: int):
        def record(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if not first:
                first.append(hidden)
            missing = [name for name in carry if name not in kwargs]
            if missing:
                raise UnsupportedFamilyError(f"decoder layer {index} is not called with {missing[0]}, which its family hands from layer to "
                                             "layer; streaming cannot run this model")
            calls.append(LayerCall(tuple(args[1:]), kwargs, carry))
            if index == len(layers) - 1:
                raise _Captured
            return stand_in_output(hidden, carry)

        return record

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    except _Captured:
        pass
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
    if len(calls) != len(layers):
        raise UnsupportedFamilyError(f"the model's forward called {len(calls)} of its {len(layers)} decoder layers; streaming cannot run it")
    return first[0], calls, {k: v for k, v in calls[0].kwargs.items() if isinstance(v, MutableMapping)}
