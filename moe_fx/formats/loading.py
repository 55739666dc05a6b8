"""Load a checkpoint directory with errors that name the problem (missing, not a model, corrupt)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moe_fx.errors import NotAModelError, first_line
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


def load_model(path: str | Path, *, dtype: str = "auto", device: str = "cpu", experts_implementation: str | None = DEFAULT_IMPLEMENTATION):
    """``from_pretrained`` with checks first and clear errors after; per-layer-count checkpoints load too.

    The routed experts run with ``experts_implementation`` (moe-fx's own by default: see
    :mod:`moe_fx.kernels`; ``None`` keeps transformers' default) where the model can switch."""
    p = check_model_dir(path)
    try:
        model = model_class(p).from_pretrained(p, dtype=parse_dtype(dtype), device_map=None)
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as exc:  # ImportError: a quantizer's package is missing
        raise NotAModelError(f"{p}: could not load the checkpoint ({type(exc).__name__}: {first_line(exc)})") from None
    if experts_implementation is not None and current(model) is not None:
        set_implementation(model, experts_implementation)
    return model.to(device).eval()


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise NotAModelError(f"{path}: no usable tokenizer ({first_line(exc, 200)})") from None
