"""Load a checkpoint directory with errors that name the problem (missing, not a model, corrupt)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from moe_fx.errors import NotAModelError, first_line
from moe_fx.formats.compressed_experts import DEFAULT_GROUP
from moe_fx.formats.stored_format import block_fp8, quantization_config, scheme_of
from moe_fx.kernels.implementation import DEFAULT_IMPLEMENTATION, current, set_implementation

DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str):
    try:
        return DTYPES[name]
    except KeyError:
        raise NotAModelError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}") from None


def check_model_dir(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise NotAModelError(f"{p}: no such file or directory")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise NotAModelError(f"{p}: not a model directory (expected config.json and *.safetensors)")
    try:
        json.loads((p / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NotAModelError(f"{p / 'config.json'}: not valid JSON ({exc})") from None
    weights = sorted(p.glob("*.safetensors"))
    if not weights and not any(p.glob("*.bin")):
        raise NotAModelError(f"{p}: no weight files (*.safetensors) found")
    for f in weights:
        _check_safetensors(f)
    return p


def _check_safetensors(path: Path) -> None:
    """Open the header (cheap: no tensor is read) so a truncated or corrupt file is named before loading."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt"):
            pass
    except (SafetensorError, OSError) as exc:
        raise NotAModelError(f"{path}: corrupt safetensors file ({exc}); re-download or re-save the checkpoint") from None


def model_class(path: Path):
    """The recorded architecture's class (``AutoModelForCausalLM`` when none is recorded), or for a checkpoint with per-layer expert counts (``moe_fx_layout`` in its
    config) its recorded architecture re-shaped by :func:`~moe_fx.model.per_layer.per_layer_class`:
    the same code the checkpoint ships for ``trust_remote_code``, run from moe-fx instead."""
    import transformers

    from moe_fx.model.per_layer import LAYOUT_KEY, per_layer_class

    config = json.loads((path / "config.json").read_text())
    name = (config.get("architectures") or [""])[0]
    if LAYOUT_KEY not in config:  # the class that wrote it (multimodal models have no causal-LM auto class)
        return getattr(transformers, name, None) or transformers.AutoModelForCausalLM
    if not hasattr(transformers, name):
        raise NotAModelError(f"{path}: per-layer checkpoint of architecture {name!r}, which this transformers does not have")
    return per_layer_class(getattr(transformers, name))


def load_model(path: str | Path, *, dtype: str = "auto", device: str = "cpu", experts_implementation: str | None = DEFAULT_IMPLEMENTATION,
               quantize: str | None = "auto", ragged: bool = True):
    """``from_pretrained`` with checks first and clear errors after; per-layer-count checkpoints load too.

    Experts stored in width buckets (:mod:`moe_fx.formats.ragged`) are held that way (``ragged``: their stored size in
    memory), or zero-padded to their block's widest with ``ragged=False``: what passes that rewrite experts read.

    The routed experts run with ``experts_implementation`` (moe-fx's own by default: see
    :mod:`moe_fx.kernels`; ``None`` keeps transformers' default) where the model can switch.

    ``quantize``: a scheme of :mod:`moe_fx.kernels.quantized` stores the routed experts quantized in memory
    (:func:`~moe_fx.rewrite.quantize_experts.quantize_experts_`); ``None`` keeps them dense; ``auto`` keeps a
    quantized checkpoint's experts in their stored scheme on CUDA (:func:`stored_scheme`), where the moe_fx
    kernels read the codes (elsewhere dense). Integer checkpoints load through transformers' compressed-tensors
    integration (dequantized) and are quantized again: codes equal, scales within bfloat16 rounding.
    A block-wise FP8 checkpoint is always read through transformers' dequantizing path, which needs no FP8
    kernels (and holds the dense weights in memory while loading); its experts are then quantized again. From
    a checkpoint quantized from bfloat16 weights (``moe-fx quantize``'s, the hub's) in bfloat16, that gives
    back the stored codes and scales exactly: each block's largest weight is a bfloat16 value, so its scale
    is recomputed bit for bit, and every other dequantized value rounds back to its code."""
    from moe_fx.formats.ragged import pad_buckets_
    from moe_fx.kernels.quantized import check_scheme
    from moe_fx.model.trace import refuse_substituted
    from moe_fx.rewrite.quantize_experts import quantize_experts_

    p = check_model_dir(path)
    stored = quantization_config(p)
    if quantize not in (None, "auto"):
        check_scheme(quantize)
    scheme = (_scheme_of(stored) if torch.device(device).type == "cuda" else None) if quantize == "auto" else quantize
    dequantizing = _dequantizing(stored)
    kwargs = {"quantization_config": dequantizing} if dequantizing is not None else {}
    try:
        with warnings.catch_warnings():  # transformers warns that only the loading attributes passed are used: as meant
            warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
            model = model_class(p).from_pretrained(p, dtype=parse_dtype(dtype), device_map=None, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as exc:  # ImportError: a quantizer's package is missing
        raise NotAModelError(f"{p}: could not load the checkpoint ({type(exc).__name__}: {first_line(exc)})") from None
    if block_fp8(stored) and isinstance(parse_dtype(dtype), torch.dtype):
        # transformers' dequantizing FP8 loader (5.23) leaves the layers it did not quantize in the checkpoint's
        # dtype beside dequantized ones in the one asked for: a float32 checkpoint with FP8 attention would not run
        model = model.to(parse_dtype(dtype))
    if not ragged:
        refuse_substituted(model)  # no padded form: the constants sit beside fewer experts than the router routes to
        pad_buckets_(model)
    if experts_implementation is not None and current(model) is not None:
        set_implementation(model, experts_implementation)
    if scheme is not None:
        quantize_experts_(model, scheme)
    return model.to(device).eval()


def stored_in_buckets(path: str | Path) -> bool:
    """Whether a checkpoint stores experts in width buckets (:mod:`moe_fx.formats.ragged`): its weights are not the
    padded experts' tensors that streaming and quantizing read shard by shard."""
    return bool(stored_buckets(path))


def stored_buckets(path: str | Path) -> dict[str, dict]:
    """Per block path, the ``moe_fx_layout`` entry of each block a checkpoint stores in width buckets (none for a
    stock one)."""
    from moe_fx.model.per_layer import LAYOUT_KEY

    layout = json.loads((Path(path) / "config.json").read_text()).get(LAYOUT_KEY) or {"blocks": {}}
    return {p: block for p, block in layout["blocks"].items() if block.get("buckets")}


def stored_scheme(path: Path) -> str | None:
    """The in-memory scheme that holds a quantized checkpoint's experts as stored: ``fp8-block`` for block-wise
    FP8, ``int8-channel`` / ``int4-group`` (groups of 128) for compressed-tensors' symmetric integer formats
    (``moe-fx quantize``'s); ``None`` for anything else."""
    return _scheme_of(quantization_config(path))


def _scheme_of(config: dict) -> str | None:
    found = scheme_of(config)
    return found.scheme if found is not None and found.group_size == DEFAULT_GROUP else None


def _dequantizing(config: dict):
    """The transformers quantization config that loads a quantized checkpoint's layers dense (``None``: none
    needed). Block-wise FP8: ``dequantize=True``, which loads anywhere, no FP8 kernel needed. compressed-tensors:
    ``run_compressed=False``, so that linear layers stored quantized (``--targets linear``) load as plain linear
    layers rather than decompressing their weights at every call on a GPU."""
    if block_fp8(config):
        from transformers import FineGrainedFP8Config

        keys = ("activation_scheme", "weight_block_size", "modules_to_not_convert")
        return FineGrainedFP8Config(dequantize=True, **{k: config[k] for k in keys if k in config})
    if config.get("quant_method") == "compressed-tensors":
        from transformers import CompressedTensorsConfig

        return CompressedTensorsConfig(run_compressed=False)
    return None


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise NotAModelError(f"{path}: no usable tokenizer ({first_line(exc, 200)})") from None
