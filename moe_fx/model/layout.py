"""Make a rewritten model's config describe its experts: stock keys where they can, ``moe_fx_layout`` where not.

Stock configs hold one expert count and one experts width for every layer. After a rewrite the config's
count and width keys are set to the largest values, and a model of the stock class is built from it on the
meta device (no memory) and compared, tensor by tensor, with the rewritten model. If every shape matches,
the stock config describes the model and it loads in stock transformers. Otherwise (counts or widths differ
between blocks, or the width key also sizes dense layers, or a family has no width key) the width keys keep
their original value and ``config.moe_fx_layout`` records every block's tensor shapes and count/width
attributes, which :mod:`moe_fx.model.per_layer` applies on load. The result is checked the same
way, so a model whose shapes no config can describe fails here, not when a user loads the checkpoint.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from moe_fx.errors import UnsupportedFamilyError
from moe_fx.model.per_layer import LAYOUT_KEY, NoviceExperts, per_layer_class
from moe_fx.model.spec import MoEModelSpec
from moe_fx.model.tensors import get_config_key, get_tensor, set_config_key


def layout_of(model: nn.Module, spec: MoEModelSpec) -> dict:
    """The ``moe_fx_layout`` record: per block, the shape of every per-expert tensor, the value of every
    expert-count and width attribute, and (substituted experts) the ``novices`` the experts module holds."""
    blocks = {}
    for b in spec.blocks:
        attrs = dict.fromkeys(b.router.count_attrs + b.count_attrs, b.num_experts)
        attrs.update(dict.fromkeys(b.experts.width_attrs, b.experts.intermediate_size))
        blocks[b.path] = {"shapes": {n: list(get_tensor(model, n).shape) for n in b.per_expert_tensors}, "attrs": attrs}
        experts = model.get_submodule(b.experts.path)
        if isinstance(experts, NoviceExperts):  # the router (and the block) still count every expert: the model's values
            blocks[b.path]["attrs"] = {ref: int(getattr(model.get_submodule(ref.partition(":")[0]), ref.partition(":")[2])) for ref in attrs}
            blocks[b.path]["novices"] = {"module": b.experts.path, "experts": len(experts.novice_slot), "hidden": experts.novices.shape[1]}
    return {"blocks": blocks}


def shape_mismatches(model: nn.Module, cls: type, config, *, exact: bool = False) -> list[str]:
    """Names of ``model``'s tensors whose shape differs in a ``cls`` model built from ``config`` (on meta); ``exact``:
    also the tensors only one of the two has."""
    config = copy.deepcopy(config)
    with torch.device("meta"):
        ref = cls(config)
    want = {n: t.shape for n, t in ref.state_dict().items()}
    have = model.state_dict()
    bad = [n for n, t in have.items() if want.get(n, None if exact else t.shape) != t.shape]
    return bad + [n for n in want if n not in have] if exact else bad


def record_layout(model: nn.Module, spec: MoEModelSpec) -> bool:
    """Update ``model.config`` to describe the experts of ``spec``; return True when stock keys suffice.

    When the per-layer layout is needed, the width keys keep the value they had before this call: the
    original width, or a width a stock rewrite set earlier (which then sizes nothing but the experts)."""
    config = model.config
    base = getattr(type(model), "moe_fx_base", type(model))
    for ref in spec.config_count_keys:
        set_config_key(config, ref, max(b.num_experts for b in spec.blocks))
    widths = {ref: get_config_key(config, ref) for ref in spec.config_width_keys}
    for ref in spec.config_width_keys:
        set_config_key(config, ref, max(b.experts.intermediate_size for b in spec.blocks))
    if hasattr(config, LAYOUT_KEY):
        delattr(config, LAYOUT_KEY)
    layout = layout_of(model, spec)
    # substituted experts' constants are tensors no stock class has (a non-exact shape check does not see them)
    if not shape_mismatches(model, base, config) and not any("novices" in b for b in layout["blocks"].values()):
        return True
    for ref, value in widths.items():
        set_config_key(config, ref, value)
    setattr(config, LAYOUT_KEY, layout)
    bad = shape_mismatches(model, per_layer_class(base), config)
    if bad:
        raise UnsupportedFamilyError(
            f"the rewritten experts cannot be described by a config: tensors {bad[:3]} would load with other shapes"
        )
    return False
