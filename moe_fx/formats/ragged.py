"""Per-expert widths stored at their size: a block's experts grouped into width buckets.

Channel allocations that give each expert its own width (``expert``, ``coverage``) leave every experts module
zero-padded to its block's widest expert: the function is the pruned one, but almost nothing is saved on disk or in
memory. Before writing a checkpoint, :func:`ragged_experts` finds each expert's real width from its weights (its
neurons after the last one whose up projection is nonzero are padding: with a zero up projection a neuron's
activation is zero, so cutting it, and its down column, changes no output), groups the experts into at most
:data:`MAX_BUCKETS` buckets of one width each (:func:`plan_buckets`: the grouping that stores the fewest channels),
and swaps each such block's experts for a :class:`~moe_fx.model.per_layer.BucketedExperts` while the checkpoint is
written. The config records the buckets (``moe_fx_layout``); ``moe_fx.load`` and ``from_pretrained(...,
trust_remote_code=True)`` rebuild them, and :func:`pad_buckets_` turns a loaded bucketed model back into padded
experts for passes that rewrite it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

from moe_fx.errors import BadOptionError
from moe_fx.kernels import experts_module
from moe_fx.model.expert_weights import NeuronTensor, neuron_index, neuron_tensors, rebuilt
from moe_fx.model.layout import layout_of, shape_mismatches
from moe_fx.model.per_layer import LAYOUT_KEY, BucketedExperts, per_layer_class, resized_copy
from moe_fx.model.spec import MoEBlockSpec, MoEModelSpec
from moe_fx.model.tensors import get_tensor
from moe_fx.plan.buckets import MAX_BUCKETS, plan_buckets

MIN_SAVING = 0.02
"""Share of the routed experts' stored parameters buckets must save for a checkpoint to use them (else padded: the
stock format where the config can describe it)."""


def expert_widths(model: nn.Module, block: MoEBlockSpec) -> list[int] | None:
    """Each expert's width: one past its last neuron with a nonzero up projection (weights or bias). None where the
    family's activation of a zero projection is not zero (trailing neurons would then not be padding)."""
    tensors, _ = neuron_tensors(model, block.experts)
    experts = model.get_submodule(block.experts.path)
    up = tensors[0]
    if not experts_module.zero_maps_to_zero(experts, up.index.shape[1], up.index.shape[0], get_tensor(model, up.name)):
        return None
    used = None
    for nt in tensors:
        if nt.name == block.experts.down:
            continue
        t = get_tensor(model, nt.name).detach()
        nonzero = nt.stacked(t).flatten(2).ne(0).any(-1)  # [E, I]
        used = nonzero if used is None else used | nonzero
    last = torch.arange(1, used.shape[1] + 1, device=used.device).mul(used).amax(-1)
    return [max(1, int(w)) for w in last]


def _neurons(nt: NeuronTensor) -> list:
    """How a neuron-indexed tensor's layout is recorded: ``[axis, parts, concatenated]``."""
    return [nt.axis, nt.index.shape[1], nt.concatenated]


def _attr(name: str) -> str:
    return name.rpartition(".")[2]


def block_buckets(model: nn.Module, block: MoEBlockSpec, max_buckets: int = MAX_BUCKETS) -> dict | None:
    """The ``buckets`` record of one block (experts module path, groups with their experts, width, tensor shapes
    and count/width attributes, each neuron-indexed tensor's layout), or None where buckets would not help: one
    width already, a call style other than ``routed``, or trailing neurons that are not padding."""
    if block.experts.call_style != "routed":
        return None
    widths = expert_widths(model, block)
    if widths is None:
        return None
    groups = plan_buckets(widths, max_buckets, most=block.experts.intermediate_size)
    if len(groups) == 1 and groups[0][0] >= block.experts.intermediate_size:
        return None
    tensors, passive = neuron_tensors(model, block.experts)
    path = block.experts.path
    counts = [r.rpartition(":")[2] for r in block.count_attrs if r.rpartition(":")[0] == path]
    widths_attrs = [r.rpartition(":")[2] for r in block.experts.width_attrs if r.rpartition(":")[0] == path]
    records = []
    for width, ids in groups:
        shapes = {}
        for nt in tensors:
            shape = list(get_tensor(model, nt.name).shape)
            shape[0], shape[nt.axis + 1] = len(ids), nt.resized(width).index.numel()
            shapes[_attr(nt.name)] = shape
        for name in passive:
            shapes[_attr(name)] = [len(ids), *get_tensor(model, name).shape[1:]]
        attrs = dict.fromkeys(counts, len(ids)) | dict.fromkeys(widths_attrs, width)
        records.append({"experts": ids, "width": width, "shapes": shapes, "attrs": attrs})
    return {"module": path, "groups": records, "neurons": {_attr(nt.name): _neurons(nt) for nt in tensors},
            "passive": [_attr(n) for n in passive], "count_attrs": counts, "width_attrs": widths_attrs}


def _moved(src: torch.Tensor, attr: str, layout: list, width: int, to_width: int) -> torch.Tensor:
    """``src`` (experts first, neurons laid out as ``layout`` says at ``width``) with each expert's first neurons at
    ``to_width``: cut when narrower, zero-padded when wider."""
    axis, parts, concatenated = layout
    nt = NeuronTensor(attr, axis, neuron_index(width, parts, concatenated))
    return rebuilt(src, nt, [list(range(min(width, to_width)))] * src.shape[0], to_width)


def bucketed_module(experts: nn.Module, record: dict) -> BucketedExperts:
    """``experts`` (a padded experts module) as the buckets ``record`` describes, holding copies of its weights."""
    modules = []
    for group in record["groups"]:
        module = resized_copy(experts, group["shapes"], group["attrs"])
        with torch.no_grad():
            for attr, layout in record["neurons"].items():
                full = getattr(experts, attr).detach()
                ids = torch.tensor(group["experts"], device=full.device)
                getattr(module, attr).data = _moved(full[ids], attr, layout, full.shape[layout[0] + 1] // layout[1], group["width"])
            for attr in record["passive"]:
                full = getattr(experts, attr).detach()
                getattr(module, attr).data = full[torch.tensor(group["experts"], device=full.device)].clone()
        modules.append(module)
    return BucketedExperts(modules, [g["experts"] for g in record["groups"]])


def padded_module(bucketed: BucketedExperts, record: dict, width: int) -> nn.Module:
    """The inverse of :func:`bucketed_module`: one experts module of ``width`` holding every expert, zero-padded."""
    first = bucketed.buckets[0]
    count = bucketed.num_experts
    shapes, attrs = {}, {}
    for attr, (axis, parts, _) in record["neurons"].items():
        shape = list(getattr(first, attr).shape)
        shape[0], shape[axis + 1] = count, parts * width
        shapes[attr] = shape
    for attr in record["passive"]:
        shapes[attr] = [count, *getattr(first, attr).shape[1:]]
    attrs = dict.fromkeys(record["count_attrs"], count) | dict.fromkeys(record["width_attrs"], width)
    module = resized_copy(first, shapes, attrs)
    with torch.no_grad():
        for attr in [*record["neurons"], *record["passive"]]:
            out = getattr(module, attr).data.zero_()
            for group, part in zip(record["groups"], bucketed.buckets):
                src = getattr(part, attr).detach()
                ids = torch.tensor(group["experts"], device=out.device)
                out[ids] = _moved(src, attr, record["neurons"][attr], group["width"], width) if attr in record["neurons"] else src
    return module


def stored_parameters(model: nn.Module, spec: MoEModelSpec, buckets: dict[str, dict]) -> tuple[int, int]:
    """Routed-expert parameters ``(padded, bucketed)``: as the blocks hold them now, and with ``buckets``."""
    padded = bucketed = 0
    for b in spec.blocks:
        here = sum(get_tensor(model, n).numel() for n in b.experts.tensors)
        padded += here
        record = buckets.get(b.path)
        bucketed += here if record is None else sum(torch.Size(s).numel() for g in record["groups"] for s in g["shapes"].values())
    return padded, bucketed


def plan_storage(model: nn.Module, spec: MoEModelSpec, *, max_buckets: int = MAX_BUCKETS,
                 min_saving: float = MIN_SAVING) -> tuple[dict[str, dict], int, int]:
    """Per block path, the ``buckets`` record of the blocks to store in width buckets (none when together they would
    save less than ``min_saving`` of the routed parameters), and the routed parameters ``(padded, stored)``."""
    buckets = {b.path: r for b in spec.blocks if (r := block_buckets(model, b, max_buckets)) is not None}
    padded, stored = stored_parameters(model, spec, buckets)
    return (buckets, padded, stored) if buckets and padded - stored >= min_saving * padded else ({}, padded, padded)


def record_buckets(model: nn.Module, spec: MoEModelSpec, buckets: dict[str, dict]) -> None:
    """Record the blocks' ``buckets`` in ``model.config``'s layout (made from ``spec``'s padded shapes where stock keys
    described the model), so the per-layer class builds them on load."""
    layout = copy.deepcopy(getattr(model.config, LAYOUT_KEY, None) or layout_of(model, spec))
    for path, record in buckets.items():
        layout["blocks"][path]["buckets"] = record
    setattr(model.config, LAYOUT_KEY, layout)


def storage_summary(padded: int, stored: int, buckets: dict[str, dict]) -> dict:
    """The record's ``expert_storage`` entry: routed parameters padded and stored, and each block's ``[width, experts]``."""
    return {"routed_params_padded": padded, "routed_params_stored": stored,
            "buckets": {p: [[g["width"], len(g["experts"])] for g in r["groups"]] for p, r in buckets.items()}}


def bucket_experts_(model: nn.Module, spec: MoEModelSpec, buckets: dict[str, dict]) -> dict[str, nn.Module]:
    """Hold the experts of the blocks in ``buckets`` (:func:`plan_storage`'s first item) in width buckets, in place, and record them in
    the config; returns the padded experts modules replaced (by path). The model then computes what it did (up to
    float rounding), in its stored size."""
    record_buckets(model, spec, buckets)
    replaced: dict[str, nn.Module] = {}
    _swap_in(model, buckets, replaced)
    return replaced


def _swap_in(model: nn.Module, buckets: dict[str, dict], replaced: dict[str, nn.Module]) -> None:
    """Replace each block's padded experts by its buckets, noting each replaced module in ``replaced`` as it goes."""
    for record in buckets.values():
        replaced[record["module"]] = model.get_submodule(record["module"])
        model.set_submodule(record["module"], bucketed_module(replaced[record["module"]], record))


@contextlib.contextmanager
def held_in_buckets(model: nn.Module, buckets: dict[str, dict]) -> Iterator[None]:
    """While the block runs, the blocks in ``buckets`` hold their experts in width buckets (the config unchanged):
    what a streamed prune writes one layer at a time."""
    replaced: dict[str, nn.Module] = {}
    try:
        _swap_in(model, buckets, replaced)
        yield
    finally:
        for path, module in replaced.items():
            model.set_submodule(path, module)


@contextlib.contextmanager
def ragged_experts(model: nn.Module, spec: MoEModelSpec, *, max_buckets: int = MAX_BUCKETS,
                   min_saving: float = MIN_SAVING) -> Iterator[dict | None]:
    """While the block runs, the blocks whose experts have different widths hold them in buckets and the config
    records them, so ``save_pretrained`` writes each expert at its width; afterwards the model is as before.

    Yields :func:`storage_summary`, or None (nothing changed) when buckets would save less than ``min_saving`` of the
    routed parameters."""
    buckets, padded, stored = plan_storage(model, spec, max_buckets=max_buckets, min_saving=min_saving)
    if not buckets:
        yield None
        return
    had_layout = copy.deepcopy(getattr(model.config, LAYOUT_KEY, None))
    try:
        record_buckets(model, spec, buckets)
        with held_in_buckets(model, buckets):
            base = getattr(type(model), "moe_fx_base", type(model))
            bad = shape_mismatches(model, per_layer_class(base), model.config, exact=True)
            if bad:
                raise BadOptionError(f"experts in width buckets would not load back: tensors {bad[:3]}; save them padded")
            yield storage_summary(padded, stored, buckets)
    finally:
        if had_layout is None:
            if hasattr(model.config, LAYOUT_KEY):
                delattr(model.config, LAYOUT_KEY)
        else:
            setattr(model.config, LAYOUT_KEY, had_layout)


def pad_buckets_(model: nn.Module) -> None:
    """Give every bucketed block of a loaded model padded experts again (its recorded padded shapes), in place, and
    drop the buckets from its config: what passes that rewrite experts read. The outputs are unchanged."""
    layout = getattr(model.config, LAYOUT_KEY, None) or {"blocks": {}}
    for block in layout["blocks"].values():
        if block.get("buckets"):
            pad_block_(model, block)
            del block["buckets"]


def pad_block_(model: nn.Module, block: dict) -> None:
    """Give the bucketed block that ``block`` (its ``moe_fx_layout`` entry, with ``buckets``) describes its padded
    experts module again, in place (the recorded padded shapes; the config unchanged)."""
    record = block["buckets"]
    attr, (axis, parts, _) = next(iter(record["neurons"].items()))
    width = block["shapes"][f"{record['module']}.{attr}"][axis + 1] // parts
    model.set_submodule(record["module"], padded_module(model.get_submodule(record["module"]), record, width))
