"""Names of what a Dynamo graph reads: the model tensor behind each input and the module each node ran in.

Dynamo lifts every parameter and buffer the compiled forward reads to a graph input (``placeholder``) whose
target flattens its source, ``L['self']._modules['model']...._parameters['weight']`` becoming
``L_self_modules_model_..._parameters_weight_``, and records on each node the stack of modules it was called
in (``nn_module_stack``, keys like ``L['self'].model.layers.0.mlp.experts``). These are read back into the
model's own names (``model.layers.0.mlp.experts.down_proj``), which the canonical spec uses.
"""

from __future__ import annotations

import re

import torch
from torch import fx

_MEMBER_SPLIT = re.compile(r"_?(?:modules|parameters|buffers)_")
_ROOTS = ("L['self'].", "L['self']", "L['mod'].", "L['model'].")


def tensor_name(node: fx.Node) -> str | None:
    """The model-relative name of the parameter or buffer that a lifted graph input holds (None otherwise); a
    node a moe-fx pass put in its place (a masked copy) carries the name in ``meta["moe_fx_tensor"]``."""
    if "moe_fx_tensor" in node.meta:
        return node.meta["moe_fx_tensor"]
    if node.op != "placeholder" or not isinstance(node.target, str):
        return None
    target = node.target
    if not target.startswith(("L_self_", "L_mod_", "L_model_")) or not re.search(r"_(?:parameters|buffers)_", target):
        return None
    body = target.split("_", 2)[2].rstrip("_")
    parts = [p for p in _MEMBER_SPLIT.split(body) if p]
    return ".".join(parts) if parts else None


def module_path(node: fx.Node) -> str | None:
    """Model-relative path of the innermost module ``node`` ran in (``""``: the root; None: no record)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    for root in _ROOTS:
        if path.startswith(root):
            return path[len(root):]
    return path


def tensor_value(node: fx.Node) -> torch.Tensor | None:
    """The example (fake) tensor Dynamo recorded for ``node``, or None for non-tensor values."""
    val = node.meta.get("example_value", node.meta.get("val"))
    return val if isinstance(val, torch.Tensor) else None


def within(path: str | None, prefix: str) -> bool:
    """Whether module ``path`` is ``prefix`` or one of its submodules."""
    return path is not None and (path == prefix or path.startswith(prefix + "."))
