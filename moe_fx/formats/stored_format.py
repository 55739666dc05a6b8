"""Which quantized format a source checkpoint stores its weights in, and reading and saving such a model dense.

moe-fx reads three quantized formats besides MXFP4 (:mod:`.mxfp4`): the hub's block-wise FP8
(``quant_method: fp8`` with 128 x 128 blocks, Qwen3-30B-A3B-FP8's), and compressed-tensors' symmetric int8
per-channel and int4 per-group ``pack-quantized`` formats (``moe-fx quantize``'s, llm-compressor's W8A16 /
W4A16). Calibration and the passes run on dense weights, so:

- :func:`dense_state` turns a layer's stored tensors into dense weights under the names the model loads (a streamed
  prune reads the source one layer at a time; its raw FP8 codes loaded without their scales would be garbage);
- :func:`saved_dense` lets ``save_pretrained`` write a model that transformers dequantized on load (its recorded
  conversions end in a dequantizing step that has no reverse), and :func:`dense_config` a streamed prune's config
  without the source's ``quantization_config``;
- :func:`stored_format` says which scheme, group size and targets to write the pruned checkpoint with, so that it
  keeps its source's format (as MXFP4 sources do), unless asked otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from moe_fx.formats import compressed_experts, fp8_block

_WEIGHT_PART = re.compile(r"^(.*)\.weight(?:_packed|_scale|_shape|_scale_inv)?$")
"""A tensor of ``<module>``'s weight as either format stores it: FP8 codes (``weight``) and ``weight_scale_inv``;
compressed-tensors' ``weight_packed``, ``weight_scale`` and ``weight_shape``."""
DEQUANTIZING_STEPS = ("Fp8Dequantize", "CompressedTensorsDequantize")
"""transformers' (5.x) loading steps that dequantize block-wise FP8 and compressed-tensors weights."""
_QUANTIZED_WEIGHT = re.compile(r"^(.*)\.weight(?:_packed|_scale_inv)$")
"""A stored tensor that stands for ``<module>.weight`` in either format (codes; the scales go with them)."""


@dataclasses.dataclass(frozen=True)
class StoredFormat:
    """A quantized checkpoint's format in ``moe-fx quantize``'s terms: ``scheme`` (:data:`~moe_fx.kernels.quantized.SCHEMES`),
    ``group_size`` (int4-group's inputs per scale) and ``targets`` (experts, linear, linear+head)."""

    scheme: str
    group_size: int = compressed_experts.DEFAULT_GROUP
    targets: str = "experts"


def quantization_config(path: str | Path) -> dict:
    """The checkpoint's ``quantization_config`` (empty when it has none)."""
    return json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}


def block_fp8(config: dict) -> bool:
    """Whether a ``quantization_config`` is block-wise FP8 (``moe-fx quantize --scheme fp8-block``'s format, the
    hub's FP8 models)."""
    return config.get("quant_method") == "fp8" and bool(config.get("weight_block_size"))


def scheme_of(config: dict) -> StoredFormat | None:
    """The scheme a ``quantization_config`` describes, where moe-fx writes that format (targets not known here:
    ``experts``); ``None`` for any other (or none)."""
    if block_fp8(config):
        return StoredFormat("fp8-block") if list(config["weight_block_size"]) == [fp8_block.BLOCK] * 2 else None
    groups = list((config.get("config_groups") or {}).values()) if config.get("quant_method") == "compressed-tensors" else []
    weights = groups[0].get("weights") or {} if len(groups) == 1 else {}
    if config.get("format") != compressed_experts.FORMAT or not weights.get("symmetric") or weights.get("type") != "int":
        return None
    if weights.get("num_bits") == 8 and weights.get("strategy") == "channel":
        return StoredFormat("int8-channel")
    if weights.get("num_bits") == 4 and weights.get("strategy") == "group" and weights.get("group_size"):
        return StoredFormat("int4-group", int(weights["group_size"]))
    return None


def stored_format(path: str | Path, names: list[str] | None = None) -> StoredFormat | None:
    """The format a quantized checkpoint stores, with its targets read from which tensors carry codes (routed
    experts only, every linear layer, or the LM head too); ``None`` when it is not quantized in a format moe-fx
    writes. ``names``: the checkpoint's tensors (:func:`tensor_names` when not given)."""
    found = scheme_of(quantization_config(path))
    if found is None:
        return None
    quantized = [m.group(1) for name in (names if names is not None else tensor_names(path)) if (m := _QUANTIZED_WEIGHT.match(name))]
    targets = "experts"
    if any(".experts." not in module for module in quantized):
        targets = "linear+head" if any(module.rsplit(".", 1)[-1] == "lm_head" for module in quantized) else "linear"
    return dataclasses.replace(found, targets=targets)


def unreadable_quantization(path: str | Path) -> str | None:
    """The ``quant_method`` of a checkpoint quantized in a format moe-fx cannot read itself (neither MXFP4 nor
    :func:`scheme_of`'s); ``None`` otherwise."""
    from moe_fx.formats import mxfp4

    config = quantization_config(path)
    if not config or scheme_of(config) is not None or mxfp4.is_mxfp4({"quantization_config": config}):
        return None
    return str(config.get("quant_method") or "unknown")


def tensor_names(path: str | Path) -> list[str]:
    """The names of every tensor a safetensors checkpoint stores: its index's weight map, or its one file's header."""
    from safetensors import safe_open

    from moe_fx.formats.shards import INDEX_FILE

    index = Path(path) / INDEX_FILE
    if index.is_file():
        return list(json.loads(index.read_text())["weight_map"])
    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        return list(f.keys())


def dense_state(state: dict, fmt: StoredFormat | None, device: str | torch.device = "cpu") -> dict:
    """``state`` (checkpoint names -> tensors or safetensors slices) with every quantized weight of ``fmt`` (its
    codes and scales) replaced by the float32 weight it stands for, under ``<module>.weight``; other tensors pass
    through. The codes are moved to ``device`` first."""
    if fmt is None:
        return state
    out, parts = {}, {}
    for name, value in state.items():
        match = _WEIGHT_PART.match(name)
        base = match.group(1) if match else None
        if base is None or not _is_quantized(base, state, fmt):
            out[name] = value
            continue
        parts.setdefault(base, {})[name] = (value if isinstance(value, torch.Tensor) else value[:]).to(device)
    for base, stored in parts.items():
        key = f"{base}.weight"
        if fmt.scheme == "fp8-block":
            out[key] = fp8_block.decode(key, stored)
        else:
            out[key] = compressed_experts.decode(fmt.scheme, fmt.group_size, key, stored)
    return out


def _is_quantized(base: str, state: dict, fmt: StoredFormat) -> bool:
    """Whether module ``base``'s weight is stored quantized in ``state`` (its scales are there)."""
    if fmt.scheme == "fp8-block":
        return f"{base}.weight{fp8_block.SCALE_SUFFIX}" in state
    return f"{base}.weight_packed" in state


@contextlib.contextmanager
def saved_dense(model: nn.Module) -> Iterator[None]:
    """While it lasts, ``model`` (loaded dense from a block-wise FP8 or compressed-tensors checkpoint by
    transformers' dequantizing loaders, as :func:`~moe_fx.formats.loading.load_model` loads them) saves as a plain
    dense checkpoint: transformers' default conversions for its class replace the ones it recorded on load, which
    start with a dequantizing step that has no reverse (``save_pretrained`` fails on it). Any other model, MXFP4
    ones included (their dequantizing step reverses to a renaming, :mod:`.mxfp4`), is left as it is."""
    recorded = getattr(model, "_weight_conversions", None) or []
    if not any(type(op).__name__ in DEQUANTIZING_STEPS for c in recorded for op in getattr(c, "operations", ())):
        yield
        return
    model._weight_conversions = None
    try:
        yield
    finally:
        model._weight_conversions = recorded


@contextlib.contextmanager
def dense_config(config) -> Iterator[None]:
    """While it lasts, ``config`` has no ``quantization_config``: it describes a checkpoint whose layers a streamed
    prune read dense from a :func:`stored_format` source and wrote dense (quantized afterwards, as asked)."""
    saved = config.__dict__.pop("quantization_config", None)
    try:
        yield
    finally:
        if saved is not None:
            config.quantization_config = saved
