"""Per-layer expert counts and widths in a loadable format: the model class that re-shapes experts from the config.

Stock transformers configs hold one expert count and one experts width for every layer. A model pruned with
different counts or widths per layer records, in ``config.moe_fx_layout``, for each block the shape of every
tensor that carries one slice per expert and the value of every module attribute holding the count or the
width. The class made by :func:`per_layer_class` builds the stock model and then gives those tensors the
recorded shapes, so ``from_pretrained`` loads the smaller weights into matching shapes.

This file is copied verbatim into per-layer checkpoints as ``modeling_moe_fx.py`` (``auto_map`` points at
it), so it imports nothing but torch and transformers: ``from_pretrained(dir, trust_remote_code=True)``
works without moe-fx installed, and ``moe_fx.load(dir)`` uses the same code without remote code.
"""

from __future__ import annotations

import torch
from torch import nn

LAYOUT_KEY = "moe_fx_layout"


def apply_layout(model: nn.Module, layout: dict) -> None:
    """Give every tensor named in ``layout`` its recorded shape (uninitialised storage: the checkpoint's
    weights fill it), and set the recorded count and width attributes."""
    for block in layout["blocks"].values():
        for name, shape in block["shapes"].items():
            mod_path, _, attr = name.rpartition(".")
            mod = model.get_submodule(mod_path)
            old = getattr(mod, attr)
            new = torch.empty([int(s) for s in shape], dtype=old.dtype, device=old.device)
            if isinstance(old, nn.Parameter):
                setattr(mod, attr, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                mod.register_buffer(attr, new, persistent=attr not in mod._non_persistent_buffers_set)
        for ref, value in block["attrs"].items():
            mod_path, _, attr = ref.rpartition(":")
            setattr(model.get_submodule(mod_path), attr, int(value))


def per_layer_class(base: type) -> type:
    """A subclass of the stock model class ``base`` whose experts take the per-layer shapes of the config.

    It keeps ``base``'s name and reports itself as library code, because transformers picks the checkpoint
    key conversions (per-expert -> fused tensors, renamed prefixes) by class name and skips them for custom
    code; the weights are in ``base``'s layout, so ``base``'s conversions are the right ones.
    """

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        layout = getattr(config, LAYOUT_KEY, None)
        if layout:
            apply_layout(self, layout)

    namespace = {"__init__": __init__, "__module__": __name__, "is_custom_code": classmethod(lambda cls: False), "moe_fx_base": base}
    return type(base.__name__, (base,), namespace)
