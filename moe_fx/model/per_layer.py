"""Per-layer expert counts and widths in a loadable format: the model class that re-shapes experts from the config.

Stock transformers configs hold one expert count and one experts width for every layer. A model pruned with
different counts or widths per layer records, in ``config.moe_fx_layout``, for each block the shape of every
tensor that carries one slice per expert and the value of every module attribute holding the count or the
width. The class made by :func:`per_layer_class` builds the stock model and then gives those tensors the
recorded shapes, so ``from_pretrained`` loads the smaller weights into matching shapes.

A block whose pruned experts were *substituted* (MoNE: each replaced by a constant vector, its mean output) keeps
its router whole and its experts module only the kept experts: the block's ``novices`` record makes that module a
:class:`NoviceExperts`, whose buffers map each router expert to its kept slot or to its constant.

Experts of different widths within one block (per-expert channel allocations) are held in *buckets*: a block's
``buckets`` record lists groups of experts, each stored at one width by a copy of the family's own experts module
(so every experts implementation runs it), and :class:`BucketedExperts` routes each (token, slot) pair to its
expert's bucket. Without buckets such a block would be stored zero-padded to its widest expert.

This file is copied verbatim into per-layer checkpoints as ``modeling_moe_fx.py`` (``auto_map`` points at
it), so it imports nothing but torch and transformers: ``from_pretrained(dir, trust_remote_code=True)``
works without moe-fx installed, and ``moe_fx.load(dir)`` uses the same code without remote code.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

LAYOUT_KEY = "moe_fx_layout"


def apply_layout(model: nn.Module, layout: dict) -> None:
    """Give every tensor named in ``layout`` its recorded shape (uninitialised storage: the checkpoint's
    weights fill it), set the recorded count and width attributes, and hold bucketed blocks' experts in
    :class:`BucketedExperts`."""
    for block in layout["blocks"].values():
        for name, shape in block["shapes"].items():
            mod_path, _, attr = name.rpartition(".")
            reshape(model.get_submodule(mod_path), attr, shape)
        resized = set()
        for ref, value in block["attrs"].items():
            mod_path, _, attr = ref.rpartition(":")
            setattr(model.get_submodule(mod_path), attr, int(value))
            if attr in (*COUNT_ATTRS, *WIDTH_ATTRS):
                resized.add(mod_path)
        for mod_path in resized:
            give_layer_config(model.get_submodule(mod_path))
        if block.get("buckets"):
            build_buckets(model, block["buckets"])
        if block.get("novices"):
            record = block["novices"]
            make_novices(model.get_submodule(record["module"]), int(record["experts"]), int(record["hidden"]))


COUNT_ATTRS = ("num_experts", "num_local_experts")
"""An experts module's attribute for its expert count, in transformers' experts classes."""
WIDTH_ATTRS = ("intermediate_dim", "intermediate_size")
"""An experts module's attribute for its experts' width."""
CONFIG_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
CONFIG_WIDTH_KEYS = ("moe_intermediate_size", "intermediate_size")


class LayerConfig:
    """The model's config as one block's experts module sees it: that block's expert count and width, read from the
    module itself (so they follow a later prune), every other attribute read from (and written to) the model's
    config.

    transformers' experts classes keep the model's config (``module.config``), and code that rebuilds an experts
    module from it reads the count and the width there: transformers' FP8 loader replaces each experts module by
    ``FP8Experts(module.config)`` before loading the weights, which sized every block at the config's one count
    (a per-layer FP8 checkpoint failed to load with a size mismatch). Attributes not overridden, the experts
    implementation among them, stay the model config's, so switching it still reaches every block."""

    def __init__(self, base, experts: nn.Module, keys: dict[str, str]) -> None:
        # not through __setattr__, which writes to ``base``; ``keys``: config key -> the module's attribute
        self.__dict__.update(_base=base, _experts=experts, _keys=keys)

    def __getattr__(self, name: str):  # only for names not in __dict__ (torch.compile traces it)
        if name.startswith("__"):  # copy and pickle probe dunders on a bare instance
            raise AttributeError(name)
        return getattr(self._experts, self._keys[name]) if name in self._keys else getattr(self._base, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._base, name, value)


def give_layer_config(experts: nn.Module) -> None:
    """Make ``experts.config`` (when it has one) a :class:`LayerConfig` that reads this module's count and width
    under the config keys the model's config holds them in (the first width key it has: the experts' own before
    the dense MLP's)."""
    base = getattr(experts, "config", None)
    if base is None:
        return
    count = next((a for a in COUNT_ATTRS if hasattr(experts, a)), None)
    width = next((a for a in WIDTH_ATTRS if hasattr(experts, a)), None)
    keys = {k: count for k in CONFIG_COUNT_KEYS if count is not None and hasattr(base, k)}
    width_key = next((k for k in CONFIG_WIDTH_KEYS if hasattr(base, k)), None)
    if width is not None and width_key is not None:
        keys[width_key] = width
    experts.config = LayerConfig(base, experts, keys)


def build_buckets(model: nn.Module, record: dict) -> None:
    """Replace the padded experts module a block's ``buckets`` record names by :class:`BucketedExperts` of the recorded
    shapes (uninitialised storage, on the experts' device: the checkpoint's weights fill it)."""
    experts = model.get_submodule(record["module"])
    modules = [resized_copy(experts, group["shapes"], group["attrs"]) for group in record["groups"]]
    model.set_submodule(record["module"], BucketedExperts(modules, [g["experts"] for g in record["groups"]]))


def reshape(module: nn.Module, attr: str, shape) -> None:
    """Give ``module.attr`` (a parameter or buffer) uninitialised storage of ``shape``, keeping its kind, dtype and device."""
    old = getattr(module, attr)
    new = torch.empty([int(s) for s in shape], dtype=old.dtype, device=old.device)
    if isinstance(old, nn.Parameter):
        setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        module.register_buffer(attr, new, persistent=attr not in module._non_persistent_buffers_set)


def resized_copy(module: nn.Module, shapes: dict, attrs: dict) -> nn.Module:
    """A copy of the experts ``module`` (same class, config and flags) whose tensors in ``shapes`` have those shapes
    (uninitialised) and whose attributes in ``attrs`` have those values; ``module`` itself is left unchanged."""
    new = copy.copy(module)
    new._parameters, new._buffers, new._modules = dict(module._parameters), dict(module._buffers), dict(module._modules)
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    for attr, shape in shapes.items():
        reshape(new, attr, shape)
    for attr, value in attrs.items():
        setattr(new, attr, int(value))
    return new


class BucketedExperts(nn.Module):
    """A block's routed experts held as buckets of experts of one width each.

    ``buckets[b]`` is the family's experts module holding the experts ``members[b]`` (in that order) at its
    width. The call is the experts' own, ``(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) ->
    [T, H]``: each bucket runs on the (token, slot) pairs routed to its experts, one slot per row, and the
    routing weights combine the outputs per token, which is what the padded experts module computes (up to
    float rounding: the matmuls run over fewer channels, and the outputs are added in another order). The pairs are
    counted per bucket on the host: a data-dependent shape, so a bucketed model compiles with graph breaks, not
    ``fullgraph``.
    """

    def __init__(self, buckets: list[nn.Module], members: list[list[int]]):
        super().__init__()
        self.buckets = nn.ModuleList(buckets)
        self.members = [[int(e) for e in ids] for ids in members]
        self.num_experts = sum(len(ids) for ids in self.members)
        self._lookup: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def lookup(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(bucket_of [E], position_in_bucket [E])`` on ``device`` (plain tensors, not buffers: a model built on the
        meta device keeps no buffer values)."""
        if device not in self._lookup:
            bucket_of, position = [0] * self.num_experts, [0] * self.num_experts
            for b, ids in enumerate(self.members):
                for i, e in enumerate(ids):
                    bucket_of[e], position[e] = b, i
            self._lookup[device] = (torch.tensor(bucket_of, device=device), torch.tensor(position, device=device))
        return self._lookup[device]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        bucket_of, position = self.lookup(top_k_index.device)
        k, experts_of = top_k_index.shape[-1], top_k_index.flatten()
        flat = bucket_of[experts_of]
        # the (token, slot) pairs sorted by bucket, gathered once; one count per bucket, read in a single host sync
        # (bincount would sync again to size its output)
        order = torch.sort(flat, stable=True).indices
        counts = (flat == torch.arange(len(self.buckets), device=flat.device)[:, None]).sum(1).tolist()
        token = order // k
        rows, ids, weights = hidden_states[token], position[experts_of[order]].unsqueeze(-1), top_k_weights.flatten()[order].unsqueeze(-1)
        out = torch.zeros_like(hidden_states)
        start = 0
        for experts, n in zip(self.buckets, counts):
            part, start = slice(start, start + n), start + n
            if n == 0:  # no pair routed here (decode often reaches one bucket only)
                continue
            # one slot per row, weighted by the expert call itself, added per token as transformers' kernels add
            out.index_add_(0, token[part], experts(rows[part], ids[part], weights[part]).to(out.dtype))
        return out


def has_buckets(model: nn.Module) -> bool:
    """Whether ``model`` holds some block's experts in width buckets."""
    return any(isinstance(m, BucketedExperts) for m in model.modules())


class NoviceExperts(nn.Module):
    """Mixed into a family's experts class (:func:`novice_class`): the experts module of a block whose router still
    routes to ``E`` experts while the module holds only the kept ones.

    ``novice_slot [E]``: each router expert's slot among the held experts, -1 for a substituted one;
    ``novices [E, H]``: the constant output of each substituted expert (zero rows for the held ones). A (token,
    slot) pair routed to a substituted expert adds ``weight * novices[e]`` instead of running an expert. Its pair
    still goes through the family's own experts call, at weight 0, so every experts implementation serves the held
    experts unchanged and shapes stay static (the model compiles with ``fullgraph``). It runs one of its token's own
    held experts (the lowest held slot; slot 0 when all its slots are substituted): an expert the call reads anyway,
    and with the pairs spread over experts as the routing spreads them. All of them on one slot made that expert the
    largest group of a batch's grouped GEMM (a 64-token decode step was no faster than the unpruned model's).
    """

    novice_slot: torch.Tensor
    novices: torch.Tensor

    def held_slots(self, top_k_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(runs, held)`` for router ids ``[T, k]``: the held slot each pair runs, and whether it is its own expert."""
        slot = self.novice_slot[top_k_index]
        held = slot >= 0
        own = torch.where(held, slot, len(self.novice_slot)).amin(-1, keepdim=True)  # the token's lowest held slot
        return torch.where(held, slot, torch.where(own < len(self.novice_slot), own, 0)), held

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        runs, held = self.held_slots(top_k_index)
        out = super().forward(hidden_states, runs, top_k_weights * held)
        # sum_slots w * novices[e] as one [T, E] x [E, H] product (the held experts' rows are zero): no [T, k, H] gather
        routed = top_k_weights.new_zeros(top_k_index.shape[0], len(self.novice_slot)).scatter_add_(1, top_k_index, top_k_weights)
        return out + (routed @ self.novices.to(routed.dtype)).to(out.dtype)


_NOVICE_CLASSES: dict[type, type] = {}


def novice_class(base: type) -> type:
    """``base`` (a family's experts class) with :class:`NoviceExperts`' forward first; one class per base."""
    if base not in _NOVICE_CLASSES:
        _NOVICE_CLASSES[base] = type(f"Novice{base.__name__}", (NoviceExperts, base), {"__module__": __name__})
    return _NOVICE_CLASSES[base]


def make_novices(experts: nn.Module, num_experts: int, hidden: int) -> None:
    """Make ``experts`` a :class:`NoviceExperts` routed from ``num_experts`` router experts, with uninitialised
    ``novice_slot`` / ``novices`` buffers (on the experts' device, ``novices`` in their dtype) that the caller or
    the checkpoint fills."""
    like = next(p for p in experts.parameters() if p.is_floating_point())
    if not isinstance(experts, NoviceExperts):  # a streamed prune's layer module already is one
        experts.__class__ = novice_class(type(experts))
    experts.register_buffer("novice_slot", torch.empty(num_experts, dtype=torch.long, device=like.device))
    experts.register_buffer("novices", torch.empty(num_experts, hidden, dtype=like.dtype, device=like.device))


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

    # transformers decides whether a class may switch experts implementations by looking for its decorator in the
    # class's module source, which is this file: without asking ``base``, a fresh process silently stays on eager
    namespace = {"__init__": __init__, "__module__": __name__, "is_custom_code": classmethod(lambda cls: False), "moe_fx_base": base,
                 "_can_set_experts_implementation": classmethod(lambda cls: base._can_set_experts_implementation())}
    return type(base.__name__, (base,), namespace)
