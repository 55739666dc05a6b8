"""Block-wise FP8 expert weights in the hub's format (Qwen3-30B-A3B-FP8, DeepSeek-V3), which stock transformers
loads with its own fine-grained FP8 integration.

On disk every per-expert projection ``...experts.{e}.{proj}.weight`` becomes ``float8_e4m3fn`` with a
``...weight_scale_inv`` beside it: one float32 per 128 x 128 block (partial edge blocks allowed), the block's
largest magnitude over 448 (the format's largest value), which multiplies the stored codes back into the weight.
``config.json`` gets ``quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme":
"dynamic", "weight_block_size": [128, 128], "modules_to_not_convert": [...]}``; the list names every linear
layer and router that keeps the source dtype, so transformers converts exactly what is stored in FP8. On a GPU of compute capability 8.9+ transformers runs FP8 kernels; elsewhere it dequantizes to
bfloat16 on load.

Why hand-written rather than a library: the math is one scale per block and a cast, and the format must be the
hub's tensor names exactly (per-expert tensors, ``weight_scale_inv``), which transformers' own writer needs a GPU
to produce and torchao / compressed-tensors name differently.

What is quantized: the routed experts (nearly all of an MoE's bytes). Every linear layer (attention, shared
experts, dense MLPs, the head), the routers, norms and embeddings stay in the source dtype (a first scope: FP8
linear layers add little size and their GPU path is not verified here).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from moe_fx.errors import BadOptionError
from moe_fx.kernels import quantized

SCHEMES = ("fp8-block",)
BLOCK = quantized.FP8_BLOCK

SCALE_SUFFIX = "_scale_inv"
_EXPERT_WEIGHT = re.compile(r"(?:^|\.)experts\.\d+\.[A-Za-z0-9_]+\.weight$")
"""A routed expert's projection in the hub's per-expert layout."""


def quantization_config(not_converted: list[str]) -> dict:
    """``config.json``'s ``quantization_config`` of the scheme, with the layers that keep the source dtype."""
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK],
            "modules_to_not_convert": not_converted}


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [out, in]`` as ``float8_e4m3fn`` codes and float32 ``scale_inv [ceil(out/128), ceil(in/128)]``
    (the in-memory scheme's math, :mod:`moe_fx.kernels.quantized`, whose per-row scales repeat each block's)."""
    codes, per_row = quantized.quantize(weight, "fp8-block")
    return codes, per_row[::BLOCK].contiguous()


def dequantize(codes: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight the codes and scales stand for (what transformers computes with)."""
    return quantized.dequantize(codes, scale_inv.repeat_interleave(BLOCK, 0)[: codes.shape[0]], "fp8-block", dtype)


def plan_tensors(meta: nn.Module, keys: list[str]) -> tuple[set[str], list[str]]:
    """(the stored tensors to quantize, the layers that keep the source dtype) for a checkpoint with these tensor
    names and this model (built on meta): the routed experts' per-expert projections are quantized; every linear
    layer and router keeps the source dtype. Refuses fused on-disk experts (no per-expert tensor to write)."""
    from moe_fx.model.trace import trace

    chosen = {k for k in keys if _EXPERT_WEIGHT.search(k)}
    if not chosen:
        fused = [k for k in keys if ".experts." in k][:2]
        raise BadOptionError(f"fp8-block writes per-expert tensors (experts.N.proj.weight), and this checkpoint stores its experts "
                             f"fused ({', '.join(fused) or 'no expert tensor found'}); it cannot take this scheme")
    linears = [name for name, module in meta.named_modules() if isinstance(module, nn.Linear)]
    return chosen, list(dict.fromkeys(linears + [b.router.path for b in trace(meta).blocks]))


def quantize_directory(path: str | Path, *, source: Path | None = None, show_progress: bool = False) -> dict:
    """Rewrite a saved checkpoint's expert weights as block-wise FP8, in place (every shard, the index, the
    config), or, with ``source``, write ``source``'s shards into ``path``, which holds its other files already.
    Returns what the record keeps: the bytes before and after, the tensors quantized, the largest relative
    round-trip error."""
    from safetensors import safe_open

    from moe_fx.formats.lazy import meta_model
    from moe_fx.formats.shards import rewrite_shards, set_quantization_config, shard_files

    path = Path(path)
    shards = source or path  # its config is the one ``path`` holds
    config = json.loads((shards / "config.json").read_text())
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method")
        raise BadOptionError(f"{shards}: the checkpoint is already quantized ({method}); fp8-block needs a checkpoint in bfloat16/float16/float32")
    keys = []
    for file in shard_files(shards):
        with safe_open(str(shards / file), "pt") as f:
            keys += list(f.keys())
    chosen, not_converted = plan_tensors(meta_model(shards), keys)
    worst = 0.0

    def encode(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        nonlocal worst
        out = {}
        for name, tensor in state.items():
            if name not in chosen:
                out[name] = tensor
                continue
            codes, scale = quantize(tensor)
            worst = max(worst, _relative_error(tensor, codes, scale))
            out[name], out[name + SCALE_SUFFIX] = codes, scale
        return out

    before, after = rewrite_shards(path, encode, source=source, desc="fp8-block", show_progress=show_progress)
    set_quantization_config(path, quantization_config(not_converted))
    return {"scheme": "fp8-block", "tensors": len(chosen), "bytes_before": before, "bytes": after,
            "max_relative_error": worst, "kept_in_source_dtype": len(not_converted)}


def _relative_error(weight: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> float:
    ref = weight.float()
    return float((dequantize(codes, scale) - ref).norm() / ref.norm().clamp_min(1e-30))


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise BadOptionError(f"unknown quantization scheme {scheme!r}; use one of {', '.join(SCHEMES)}")


def quantize_checkpoint(source: str | Path, out: str | Path, *, scheme: str = "fp8-block", overwrite: bool = False,
                        show_progress: bool = False) -> dict:
    """Write ``source`` (a checkpoint directory, pruned or not, left untouched) to ``out`` with ``scheme``'s
    experts, atomically; return the record's ``quantization`` entry (also written to ``out``'s ``moe_fx.json``)."""
    from moe_fx.formats.atomic import atomic_directory
    from moe_fx.formats.checkpoint import RECORD_FILE, check_output_path
    from moe_fx.formats.loading import check_model_dir
    from moe_fx.formats.shards import INDEX_FILE, shard_files

    check_scheme(scheme)
    source = check_model_dir(source)
    out = check_output_path(out, source, overwrite)
    shards = {*shard_files(source), INDEX_FILE}
    with atomic_directory(out) as tmp:
        for item in source.iterdir():  # everything but the weights, which quantize_directory writes
            if item.name not in shards:
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        entry = quantize_directory(tmp, source=source, show_progress=show_progress)
        record_file = tmp / RECORD_FILE
        record = json.loads(record_file.read_text()) if record_file.is_file() else {"source": str(source.resolve())}
        record["quantization"] = entry
        record_file.write_text(json.dumps(record, indent=2) + "\n")
    return entry

