"""Run a causal LM one decoder layer at a time: find its layers, and capture what the model passes to each.

A model's forward prepares the layers' inputs before the layer loop: the embedded tokens, the rotary
position embeddings, the causal (or sliding-window) masks chosen per layer, position ids. Rather than
re-implement that per family, :func:`capture_layer_calls` runs the model's own forward with every decoder
layer replaced by a recorder that keeps its arguments and returns its input unchanged, and stops at the last
layer. The layers may be on ``meta`` meanwhile: none of them runs. Then ``layer(hidden, *args, **kwargs)``
reproduces, layer by layer, the full forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_fx.errors import UnsupportedFamilyError
from moe_fx.model.spec import MoEModelSpec


@dataclass
class LayerCall:
    """The arguments the model passes to one decoder layer, besides its hidden states."""

    args: tuple
    kwargs: dict

    def __call__(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = layer(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out


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


def capture_layer_calls(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[LayerCall]]:
    """The first layer's hidden states for ``input_ids`` and every layer's call, from the model's own forward."""
    calls: list[LayerCall] = []
    first: list[torch.Tensor] = []

    def recorder(index: int):
        def record(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if not first:
                first.append(hidden)
            calls.append(LayerCall(tuple(args[1:]), kwargs))
            if index == len(layers) - 1:
                raise _Captured
            return hidden

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
    return first[0], calls
