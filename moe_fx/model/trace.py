"""Discovery: find every MoE block of a transformers model and describe it as a :class:`MoEModelSpec`.

The generic rule recognises the transformers-5 layout: a block module with an experts child holding an
integer expert count ``E`` and fused tensors ``[E, ...]``, and a router child holding an ``[E, H]`` weight.
Family quirks (names, score functions, layouts) come from the adapter registry; routing rules that no
adapter declares are read from the block's torch.export graph (:mod:`moe_fx.model.fx_check`). Discovery fails
loudly: an experts module that no block claims is an error, not a silent skip.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

from moe_fx.errors import NotMoEError, UnsupportedFamilyError
from moe_fx.model.adapters import COUNT_ATTRS, GENERIC, TOPK_KEYS, WIDTH_ATTRS, WIDTH_KEYS, FamilyAdapter, get_adapter
from moe_fx.model.fx_check import infer_routing
from moe_fx.model.modules import direct_tensors, expert_count, is_routed_experts
from moe_fx.model.modules import tensors as named_tensors
from moe_fx.model.per_layer import BucketedExperts, NoviceExperts
from moe_fx.model.spec import ExpertsSpec, MoEBlockSpec, MoEModelSpec, RouterSpec, SharedExpertSpec

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|decoder_layers)\.(\d+)(?:\.|$)")


def text_config(config):
    """The decoder (text) config of a possibly multimodal config."""
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if callable(get) else config


def _join(prefix: str, name: str) -> str:
    return ".".join(p for p in (prefix, name) if p)


def _first_attr(objs, names, default=None):
    for o in objs:
        for n in names:
            v = getattr(o, n, None)
            if v is not None:
                return v
    return default


def _count_attrs(module: nn.Module, path: str, e: int, *, recurse: bool) -> list[str]:
    """``path:attr`` for every integer attribute (or Linear ``out_features``) equal to the expert count."""
    found = []
    mods = module.named_modules() if recurse else [("", module)]
    for sub_name, sub in mods:
        sub_path = _join(path, sub_name)
        for name in COUNT_ATTRS:
            if getattr(sub, name, None) == e and isinstance(getattr(sub, name), int):
                found.append(f"{sub_path}:{name}")
        if isinstance(sub, nn.Linear) and sub.out_features == e:
            found.append(f"{sub_path}:out_features")
    return found


def _parent_count_attrs(model: nn.Module, path: str, e: int) -> list[str]:
    """Count attributes of the module holding the block: Ernie-VL's ``mlp`` holds ``text_moe`` and ``vision_moe`` and
    reshapes their router logits by its own ``num_experts``, which a rewrite must update too."""
    if "." not in path:
        return []
    parent = path.rsplit(".", 1)[0]
    return _count_attrs(model.get_submodule(parent), parent, e, recurse=False)


def _router_spec(block, block_path, router, router_path, e, adapter, config, score_fn, graph_norm) -> RouterSpec:
    weight = bias = None
    for name, t in named_tensors(router, router_path):
        if t.ndim == 2 and t.shape[0] == e and weight is None:
            weight = name
        elif t.ndim == 1 and t.shape[0] == e and name.endswith("bias") and bias is None:
            if name.rsplit(".", 1)[-1] not in adapter.selection_bias_names:
                bias = name
    # the selection bias may live on the router, the block, or a sibling (Ernie 4.5 ``moe_statics``);
    # a [1, E] bias is recorded too, so a rewrite that cannot slice it fails loudly instead of skipping it
    selection_bias = next(
        (
            name
            for name, t in list(named_tensors(router, router_path)) + list(named_tensors(block, block_path))
            if name.rsplit(".", 1)[-1] in adapter.selection_bias_names and t.numel() == e
        ),
        None,
    )
    owners = (router, block)
    top_k = _first_attr(owners, ("top_k",)) or _first_attr((config,), TOPK_KEYS)
    norm = adapter.norm_topk_prob
    if norm is None:
        norm = graph_norm if graph_norm is not None else bool(_first_attr(owners + (config,), ("norm_topk_prob",), False))
    n_group = _first_attr(owners, ("num_group", "n_group")) or getattr(config, "n_group", None)
    topk_group = _first_attr(owners, ("topk_group",)) or getattr(config, "topk_group", None)
    # DeepSeek-V2's router names its rule: plain top-k ignores the groups its config declares
    topk_method = _first_attr(owners, ("topk_method",))
    if topk_method == "greedy":
        n_group = topk_group = None
    scale = _first_attr(owners, adapter.scaling_attrs) or _first_attr((config,), adapter.scaling_attrs, 1.0)
    counts = _count_attrs(router, router_path, e, recurse=True)
    return RouterSpec(
        path=router_path,
        weight=weight,
        bias=bias,
        selection_bias=selection_bias,
        score_fn=score_fn,
        top_k=int(top_k),
        norm_topk_prob=norm,
        n_group=int(n_group) if n_group else None,
        topk_group=int(topk_group) if topk_group else None,
        routed_scaling_factor=float(scale),
        count_attrs=tuple(counts),
        group_score="max" if topk_method == "group_limited_greedy" else "top2_sum",
    )


def _experts_spec(experts: nn.Module, path: str, e: int, hidden: int, adapter: FamilyAdapter, config) -> ExpertsSpec:
    names = {n.rsplit(".", 1)[-1]: n for n, _ in named_tensors(experts, path)}
    tensors = tuple(n for n, t in named_tensors(experts, path) if t.ndim >= 1 and t.shape[0] == e)
    gate_up, up, down = names.get("gate_up_proj"), names.get("up_proj"), names.get("down_proj")
    if down is None or (gate_up is None and up is None):
        raise UnsupportedFamilyError(
            f"experts module {path} ({type(experts).__name__}) has no fused gate_up_proj/up_proj + down_proj "
            f"tensors (found {sorted(names)}); this layout is not supported yet"
        )
    down_t = experts.get_parameter(down.removeprefix(path + "."))
    # families without the attribute (Llama 4 stores [E, H, 2I] / [E, I, H]) show it in the down shape
    shape_says = down_t.shape[1] != hidden and down_t.shape[2] == hidden
    is_transposed = bool(getattr(experts, "is_transposed", shape_says))
    intermediate = down_t.shape[1] if is_transposed else down_t.shape[2]
    act = getattr(config, "hidden_act", None) or getattr(config, "mlp_hidden_act", None)
    return ExpertsSpec(
        path=path,
        num_experts=e,
        hidden_size=hidden,
        intermediate_size=int(intermediate),
        tensors=tensors,
        gate_up=gate_up,
        up=up if gate_up is None else None,
        down=down,
        is_transposed=is_transposed,
        is_concatenated=bool(getattr(experts, "is_concatenated", True)),
        has_bias=bool(getattr(experts, "has_bias", False)) or any(n.endswith("_bias") for n in names),
        activation=str(act) if act else type(getattr(experts, "act_fn", None)).__name__,
        call_style=adapter.call_style,
        width_attrs=tuple(
            f"{path}:{name}" for name in WIDTH_ATTRS if type(getattr(experts, name, None)) is int and getattr(experts, name) == intermediate
        ),
    )


def _shared_specs(block: nn.Module, path: str, adapter: FamilyAdapter) -> tuple[SharedExpertSpec, ...]:
    gate_path = next((_join(path, g) for g in adapter.shared_gate_attrs if isinstance(getattr(block, g, None), nn.Module)), None)
    out = []
    for attr in adapter.shared_attrs:
        mod = getattr(block, attr, None)
        if isinstance(mod, nn.Module):
            width = getattr(mod, "intermediate_size", None)
            if width is None and isinstance(getattr(mod, "up_proj", None), nn.Linear):
                width = mod.up_proj.out_features
            out.append(SharedExpertSpec(path=_join(path, attr), gate_path=gate_path, intermediate_size=width))
    return tuple(out)


def _configs(config) -> Iterator[tuple[str, object]]:
    """The root config and every nested sub-config (text_config, ffn_config, ...) with its path."""
    seen = set()
    stack = [("", config)]
    while stack:
        path, c = stack.pop()
        if id(c) in seen:
            continue
        seen.add(id(c))
        yield path, c
        for key, value in vars(c).items():
            if hasattr(value, "to_dict") and hasattr(value, "model_type") or type(value).__name__.endswith("Config"):
                stack.append((_join(path, key), value))


def _config_keys(config, values: set[int], keys: tuple[str, ...]) -> tuple[str, ...]:
    """The config entries among ``keys`` (``"sub_config_path:stored_name"``) holding one of ``values``: any block's
    count, since a per-layer checkpoint's config holds its widest block's, which need not be the first's."""
    found = []
    for path, c in _configs(config):
        aliases = getattr(c, "attribute_map", {}) or {}
        for key in keys:
            stored = aliases.get(key, key)
            if isinstance(vars(c).get(stored), int) and vars(c)[stored] in values:  # Ernie-VL lists a count per modality
                found.append(f"{path}:{stored}")
    return tuple(dict.fromkeys(found))


def _width_keys(config, width: int, count_keys: tuple[str, ...]) -> tuple[str, ...]:
    """The experts-width config entries: the most specific key name of :data:`WIDTH_KEYS` equal to ``width``,
    in the (sub-)configs that hold the expert count (so a vision config's ``intermediate_size`` is never taken)."""
    paths = {ref.rpartition(":")[0] for ref in count_keys}
    for key in WIDTH_KEYS:
        found = tuple(ref for ref in _config_keys(config, {width}, (key,)) if ref.rpartition(":")[0] in paths)
        if found:
            return found
    return ()


def find_blocks(model: nn.Module, adapter: FamilyAdapter) -> list[tuple[str, nn.Module, str, nn.Module, str, nn.Module]]:
    """``(block_path, block, experts_path, experts, router_path, router)`` for every MoE block."""
    found, claimed = [], set()
    for path, block in model.named_modules():
        if is_routed_experts(block):
            continue
        for attr in adapter.experts_attrs:
            experts = getattr(block, attr, None)
            if not isinstance(experts, nn.Module) or not is_routed_experts(experts):
                continue
            e = expert_count(experts)
            for r_attr in adapter.router_attrs:
                router = getattr(block, r_attr, None)
                if isinstance(router, nn.Module) and any(
                    t.ndim == 2 and t.shape[0] == e for _, t in named_tensors(router, "")
                ):
                    found.append((path, block, _join(path, attr), experts, _join(path, r_attr), router))
                    claimed.add(_join(path, attr))
                    break
    unclaimed = [
        p for p, m in model.named_modules() if is_routed_experts(m) and p not in claimed and not any(p.startswith(c + ".") for c in claimed)
    ]
    if unclaimed:
        raise UnsupportedFamilyError(
            f"found routed-experts modules without a recognisable router: {unclaimed[:4]}"
            f"{' ...' if len(unclaimed) > 4 else ''}; register a FamilyAdapter for this model_type"
        )
    return found


def substituted(model: nn.Module) -> bool:
    """Whether some experts of ``model`` were substituted by constants (:class:`~moe_fx.model.per_layer.NoviceExperts`,
    also the class a remote-code load defines)."""
    return any(c.__name__ == NoviceExperts.__name__ for m in model.modules() for c in type(m).__mro__)


def refuse_substituted(model: nn.Module) -> None:
    """Raise :class:`UnsupportedFamilyError` for a :func:`substituted` model: its routers route to more experts than
    its experts modules hold, and no pass, quantizer or exporter rewrites that."""
    if substituted(model):
        raise UnsupportedFamilyError(
            f"{type(model).__name__}: some experts are substituted by constants (MoNE, --method mone), which moe-fx does not rewrite, "
            "quantize, compile or export; run those on the source model (substitution comes last)"
        )


def trace(model: nn.Module) -> MoEModelSpec:
    """Describe every MoE block of ``model``.

    Raises :class:`NotMoEError` for a model without routed experts and :class:`UnsupportedFamilyError`
    for routed experts in a layout moe-fx cannot rewrite.
    """
    if any(type(m).__name__ == BucketedExperts.__name__ for m in model.modules()):  # also the class a remote-code load defines
        raise UnsupportedFamilyError(
            f"{type(model).__name__}: its experts are stored in width buckets (per-expert widths); moe-fx rewrites, quantizes and "
            "exports padded experts: load it with moe_fx.load(path, ragged=False), or prune with --expert-storage padded"
        )
    refuse_substituted(model)
    config = model.config
    tconf = text_config(config)
    model_type = getattr(tconf, "model_type", None) or config.model_type
    adapter = get_adapter(model_type)
    if adapter is GENERIC and config.model_type != model_type:
        adapter = get_adapter(config.model_type)
    if adapter.unsupported:
        raise UnsupportedFamilyError(f"model_type {model_type!r} is not supported: {adapter.unsupported}")
    found = find_blocks(model, adapter)
    if not found:
        raise NotMoEError(
            f"{type(model).__name__} (model_type {model_type!r}) has no block with routed experts: "
            "moe-fx prunes Mixture-of-Experts models only"
        )
    score_fn, graph_norm = adapter.score_fn, None
    if score_fn is None:
        routing = infer_routing(model, found[0][0])
        score_fn = routing.score_fn
        if adapter.norm_topk_prob is None:
            # explicit renormalisation only; softmax over the k selected logits is normalised by itself
            graph_norm = routing.normalized
    blocks = []
    for path, block, e_path, experts, r_path, router in found:
        e = expert_count(experts)
        router_spec = _router_spec(block, path, router, r_path, e, adapter, tconf, score_fn, graph_norm)
        # the experts' own width where they declare it: MuseSpark's experts run at moe_hidden_size, not the router's width
        hidden = getattr(experts, "hidden_dim", None) or model.get_parameter(router_spec.weight).shape[1]
        block_tensors = tuple(
            n for n, t in direct_tensors(block, path) if n.rsplit(".", 1)[-1] in adapter.block_tensors and t.shape[:1] == (e,)
        )
        m = _LAYER_RE.search(path)
        blocks.append(
            MoEBlockSpec(
                path=path,
                layer_index=int(m.group(1)) if m else None,
                router=router_spec,
                experts=_experts_spec(experts, e_path, e, hidden, adapter, tconf),
                shared=_shared_specs(block, path, adapter),
                block_tensors=block_tensors,
                count_attrs=tuple(_count_attrs(block, path, e, recurse=False) + _count_attrs(experts, e_path, e, recurse=False)
                                  + _parent_count_attrs(model, path, e)),
            )
        )
    num_layers = int(getattr(tconf, "num_hidden_layers", 0) or 0)
    moe_layers = {b.layer_index for b in blocks}
    count_keys = _config_keys(config, {b.num_experts for b in blocks}, COUNT_ATTRS)
    return MoEModelSpec(
        model_type=model_type,
        family=adapter.name,
        num_layers=num_layers,
        blocks=tuple(blocks),
        dense_layers=tuple(i for i in range(num_layers) if i not in moe_layers),
        config_count_keys=count_keys,
        config_topk_keys=_config_keys(config, {blocks[0].top_k}, TOPK_KEYS),
        config_width_keys=_width_keys(config, blocks[0].experts.intermediate_size, count_keys),
        layer_carry=adapter.layer_carry,
    )
