"""Read a checkpoint one decoder layer at a time into a model skeleton on the meta device.

A streaming run never holds the whole model: :func:`meta_model` builds the architecture with every parameter
on ``meta`` (no memory) and only the small non-persistent buffers (rotary frequencies) computed for real;
:class:`LazyCheckpoint` memory-maps the safetensors files and loads the tensors of one group of keys (one
decoder layer, or everything outside the layers) into that skeleton. Loading goes through transformers' own
key renaming and conversion (``convert_and_load_state_dict_in_model``: per-expert checkpoint tensors fused into
``gate_up_proj``/``down_proj``, legacy names), so a layer loads exactly as ``from_pretrained`` would load it.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from moe_fx.errors import NotAModelError, first_line
from moe_fx.formats import mxfp4
from moe_fx.formats.loading import check_model_dir, model_class, parse_dtype
from moe_fx.formats.read_ahead import ReadAhead
from moe_fx.formats.stored_format import dense_state, stored_format, unreadable_quantization
from moe_fx.model.per_layer import LAYOUT_KEY

INDEX_FILE = "model.safetensors.index.json"
_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_of_key(key: str) -> int | None:
    """The decoder layer a checkpoint key belongs to (``...layers.<i>....``), None outside the layers."""
    m = _LAYER_KEY.search(key)
    return int(m.group(1)) if m else None


def _transformers_loading():
    """transformers' weight-conversion loader (5.x); an older transformers is named in a clear error."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model, revert_weight_conversion
        from transformers.modeling_utils import LoadStateDictConfig
    except ImportError as exc:
        import transformers

        raise NotAModelError(
            f"streaming needs transformers 5's weight-conversion loader, not found in transformers {transformers.__version__} ({exc}); "
            "upgrade transformers (pip install 'transformers>=5.23')"
        ) from None
    return get_model_conversion_mapping, convert_and_load_state_dict_in_model, revert_weight_conversion, LoadStateDictConfig


def resolve_dtype(config, name: str | torch.dtype) -> torch.dtype:
    """``name`` as a torch dtype; ``auto``: the checkpoint's own (as ``from_pretrained(dtype="auto")``)."""
    dtype = parse_dtype(name) if isinstance(name, str) else name
    if dtype != "auto":
        return dtype
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, stored) if isinstance(stored, str) else stored


def meta_model(path: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> nn.Module:
    """The checkpoint's model class built from its config with every parameter on ``meta`` (experts stored in width
    buckets padded, as the passes read them); non-persistent
    buffers (rotary inverse frequencies, not stored in checkpoints) are computed on ``device`` by the model's own
    initialisation, as ``from_pretrained`` does."""
    from transformers import AutoConfig

    p = check_model_dir(path)
    config = AutoConfig.from_pretrained(p)
    for block in (getattr(config, LAYOUT_KEY, None) or {"blocks": {}})["blocks"].values():
        block.pop("buckets", None)  # experts padded, as passes read them (load_model(ragged=False) loads them so)
    cls = model_class(p)
    with torch.device("meta"):  # an auto class (a config without ``architectures``) builds through from_config
        build = cls.from_config if hasattr(cls, "_model_mapping") else cls._from_config
        model = build(config, dtype=resolve_dtype(config, dtype))
    owners = set()
    for name, buf in list(model.named_non_persistent_buffers()):
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        module.register_buffer(attr, torch.empty_like(buf, device=device), persistent=False)
        owners.add(owner)
    for owner in owners:
        model._init_weights(model.get_submodule(owner))
    model.name_or_path = str(p)
    return model.eval()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' per-call "Loading weights" progress bar, silenced while streaming shows its own."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class LazyCheckpoint:
    """The tensors of a safetensors checkpoint (one file, or shards listed by ``model.safetensors.index.json``),
    memory-mapped and read on demand. Every shard is opened (header only) up front, so a missing or corrupt
    shard is reported before any work starts."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = check_model_dir(path)
        files = self._files()
        self._stack = contextlib.ExitStack()
        self.file_of: dict[str, object] = {}
        for f in files:
            handle = self._stack.enter_context(safe_open(f, framework="pt"))
            self.file_of.update(dict.fromkeys(handle.keys(), handle))
        if not self.file_of:
            raise NotAModelError(f"{self.path}: the checkpoint holds no tensors")
        method = unreadable_quantization(self.path)
        if method is not None:  # its codes would load as if they were weights
            raise NotAModelError(f"{self.path}: its weights are quantized ({method}), which streaming cannot read; it reads block-wise FP8, "
                                 "compressed-tensors' int8 / int4 (pack-quantized) and MXFP4: prune with --stream off")
        self.format = stored_format(self.path, list(self.file_of))
        """The source's quantized format (:mod:`.stored_format`): each layer's weights are read dense."""
        self.read_ahead = self._stack.enter_context(contextlib.closing(ReadAhead(files)))
        """Start reading a group of keys into the page cache while other work runs (``read_ahead.start(keys)``)."""

    def _files(self) -> list[Path]:
        index = self.path / INDEX_FILE
        if not index.is_file():
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise NotAModelError(f"{self.path}: streaming reads safetensors checkpoints; no *.safetensors file found")
            return files
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise NotAModelError(f"{index}: not a valid safetensors index ({first_line(exc, 100)})") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (self.path / n).is_file()]
        if missing:
            raise NotAModelError(
                f"{self.path}: shard(s) {missing[:3]} listed in {INDEX_FILE} are missing; re-download the checkpoint"
            )
        return [self.path / n for n in names]

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> LazyCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def keys_by_layer(self, num_layers: int) -> tuple[dict[int, list[str]], list[str]]:
        """Checkpoint keys per decoder layer, and the keys outside the first ``num_layers`` layers (embeddings,
        final norm, head; extra layers such as DeepSeek-V3's multi-token-prediction layer, which the model
        class does not load, go there too and are skipped as unexpected keys)."""
        per_layer: dict[int, list[str]] = {i: [] for i in range(num_layers)}
        rest = []
        for key in self.file_of:
            layer = layer_of_key(key)
            (per_layer[layer] if layer is not None and layer < num_layers else rest).append(key)
        return per_layer, rest

    def load_into(self, model: nn.Module, keys: Iterable[str], *, device: str | torch.device, dtype: torch.dtype) -> None:
        """Load the tensors of ``keys`` into ``model`` on ``device`` through transformers' conversion; a model
        parameter that those keys should fill and did not is an error naming it."""
        mapping_of, convert_and_load, _, load_config_cls = _transformers_loading()
        keys = list(keys)
        slices = {k: self.file_of[k].get_slice(k) for k in keys}
        state = dense_state(mxfp4.unpack_state(slices, device), self.format, device)  # quantized weights: dequantized on the device
        config = load_config_cls(device_map={"": str(device)}, dtype=dtype, weight_mapping=mapping_of(model))
        with _quiet_transformers():
            info, _ = convert_and_load(model, state, config)
        if info.conversion_errors or info.mismatched_keys:
            bad = list(info.conversion_errors.items())[:2] or sorted(info.mismatched_keys)[:2]
            raise NotAModelError(f"{self.path}: could not load {bad} into the model; the checkpoint does not match its config")


def revert_to_checkpoint_names(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (model names, fused experts) in the layout ``save_pretrained`` writes (per-expert tensors,
    legacy names): transformers' own reverse conversion, applied to one layer's tensors at a time."""
    return _transformers_loading()[2](model, state)
