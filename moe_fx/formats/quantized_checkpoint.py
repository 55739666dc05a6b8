"""``moe-fx quantize``: a checkpoint's routed experts rewritten in a quantized on-disk format, shard by shard.

Schemes and formats:

- ``fp8-block``: the hub's block-wise FP8 format (:mod:`.fp8_block`), which transformers' FP8 integration loads.
- ``int8-channel``, ``int4-group``: compressed-tensors' format (:mod:`.compressed_experts`), which vLLM serves
  and transformers loads with the ``compressed-tensors`` package.

``targets`` says what changes: ``experts`` (the default) the per-expert projections
``...experts.{e}.{proj}.weight`` only, every other linear layer and the routers listed as kept in the source
dtype; ``linear`` every linear layer too (attention, shared experts, dense MLPs), as the hub's FP8 checkpoints
(Qwen3-30B-A3B-FP8) store them, except the routers and the LM head; ``linear+head`` the LM head too, where the
checkpoint stores it apart from the embeddings (tied, it keeps the source dtype: quantizing it would quantize the
embedding table). Norms, embeddings and routers always keep the source dtype. Checkpoints whose experts are
stored fused (GPT-OSS) are refused, since they have no per-expert tensor to write, and so are checkpoints that
are already quantized.

transformers' FP8 loader derives a tensor's block size from its scale grid (rows / scale rows), so a dimension
over 128 that is not a multiple of 128 would load with the wrong blocks: such an expert projection is refused,
such a linear layer keeps the source dtype, as does, for int4-group, one whose input size the group does not
divide.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from moe_fx.errors import BadOptionError
from moe_fx.formats import compressed_experts, fp8_block
from moe_fx.formats.stored_format import tensor_names
from moe_fx.kernels import quantized
from moe_fx.kernels.quantized import check_scheme

SCHEMES = tuple(quantized.SCHEMES)
"""Every in-memory scheme has a checkpoint format."""
TARGETS = ("experts", "linear", "linear+head")
"""What a checkpoint's quantization covers (module doc)."""
_EXPERT_WEIGHT = re.compile(r"(?:^|\.)experts\.\d+\.[A-Za-z0-9_]+\.weight$")
"""A routed expert's projection in the hub's per-expert layout."""


@dataclasses.dataclass(frozen=True)
class Codec:
    """How one scheme writes a per-expert projection: ``encode(key, weight)`` -> stored tensors, ``decode(key,
    stored)`` -> the float32 weight they stand for, ``config(not_converted)`` -> ``quantization_config``."""

    encode: Callable[[str, torch.Tensor], dict[str, torch.Tensor]]
    decode: Callable[[str, dict[str, torch.Tensor]], torch.Tensor]
    config: Callable[[list[str]], dict]


def codec(scheme: str, group_size: int = compressed_experts.DEFAULT_GROUP) -> Codec:
    """The scheme's codec; a bad scheme, or compressed-tensors missing for the integer ones, fails here."""
    check_scheme(scheme)
    if scheme == "fp8-block":
        return Codec(fp8_block.encode, fp8_block.decode, fp8_block.quantization_config)
    compressed_experts.scheme_of(scheme, group_size)
    return Codec(partial(compressed_experts.encode, scheme, group_size), partial(compressed_experts.decode, scheme, group_size),
                 partial(compressed_experts.quantization_config, scheme, group_size))


def check_targets(targets: str) -> None:
    if targets not in TARGETS:
        raise BadOptionError(f"unknown quantization targets {targets!r}; use one of {', '.join(TARGETS)}")


def check_before_pruning(source: Path, scheme: str, *, group_size: int = compressed_experts.DEFAULT_GROUP, targets: str = "experts") -> None:
    """Refuse ``prune --quantize scheme`` before any work: bad targets, a missing library, experts stored fused,
    and for int4-group the source's expert input sizes (the hidden size, the experts' width) that its group size
    does not divide. Channel-pruned widths are known only after the passes: the writer then takes a smaller group
    where one needs it (``fit_group``), and says so."""
    from moe_fx.formats.lazy import meta_model
    from moe_fx.model.trace import trace

    codec(scheme, group_size)
    check_targets(targets)
    # the pruned copy stores its experts as the source does: fused ones (GPT-OSS) have no per-expert tensor to write
    # (a quantized source's per-expert codes: ``weight`` in FP8, ``weight_packed`` in compressed-tensors' format)
    names = tensor_names(source)
    if not any(_EXPERT_WEIGHT.search(k.removesuffix("_packed")) for k in names):
        raise _fused_experts_error(scheme, names, meta_model(source))
    if scheme != "int4-group":
        return
    for block in trace(meta_model(source)).blocks:
        for what, size in {"hidden size": block.experts.hidden_size, "expert width": block.experts.intermediate_size}.items():
            compressed_experts.check_group(scheme, group_size, size, f"{block.path} {what}")


def plan_tensors(meta: nn.Module, shapes: dict[str, tuple[int, ...]], scheme: str, targets: str = "experts",
                 group_size: int = compressed_experts.DEFAULT_GROUP) -> tuple[set[str], list[str]]:
    """(the stored tensors to quantize, the layers that keep the source dtype) for a checkpoint with these tensors
    (name -> shape) and this model (built on meta): the routed experts' per-expert projections, and with
    ``targets="linear"`` every other linear layer but the routers and the LM head (``"linear+head"``: and the
    head, when stored untied). Refuses fused on-disk experts (no per-expert tensor to write), and refuses before
    writing what the scheme cannot store (module doc)."""
    from moe_fx.model.trace import trace

    experts = {k for k in shapes if _EXPERT_WEIGHT.search(k)}
    if not experts:
        raise _fused_experts_error(scheme, list(shapes), meta)
    for key in experts:
        if not _storable(scheme, shapes[key]):
            raise BadOptionError(f"{key}: shape {list(shapes[key])} has a dimension over {fp8_block.BLOCK} that is not a multiple of it, "
                                 f"which transformers' FP8 loader cannot read back; use int8-channel or int4-group, or prune the "
                                 f"source with --quantize fp8-block (PruneChannels(align={fp8_block.BLOCK}) in Python), which keeps "
                                 f"channel widths in whole {fp8_block.BLOCK}-channel blocks")
    routers = [b.router.path for b in trace(meta).blocks]
    head = meta.get_output_embeddings()
    chosen, kept = set(experts), []
    for name, module in meta.named_modules():
        if not isinstance(module, nn.Linear) or name in routers:
            continue
        key = f"{name}.weight"
        wanted = targets == "linear+head" if module is head else targets != "experts"
        if (wanted and key in shapes and _storable(scheme, shapes[key])
                and compressed_experts.group_fits(scheme, group_size, module.in_features)):
            chosen.add(key)
        else:
            kept.append(name)
    return chosen, list(dict.fromkeys(kept + routers))


def _fused_experts_error(scheme: str, names: list[str], meta: nn.Module) -> BadOptionError:
    """The refusal of a checkpoint without per-expert tensors (among its tensor ``names``): its experts are stored
    fused (GPT-OSS, GraniteMoE), and the scheme's format has no tensor to write them in. The message names the
    stored tensors of the MoE blocks that ``meta`` (the model on meta) traces, but their routers' and shared
    experts' (the stored names of fused experts need not be the module's: GraniteMoE's ``input_linear``). Built
    only when refusing: tracing ``meta`` is no work for a checkpoint that takes the scheme."""
    from moe_fx.model.trace import trace

    blocks = trace(meta).blocks
    inside = tuple(f"{b.path}." for b in blocks)
    other = tuple(f"{p}." for b in blocks for p in (b.router.path, *(s.path for s in b.shared)))
    fused = [k for k in names if k.startswith(inside) and not k.startswith(other)][:2]
    return BadOptionError(f"{scheme} writes per-expert tensors (experts.N.proj.weight), and this checkpoint stores its experts "
                          f"fused ({', '.join(fused) or 'no expert tensor found'}); it cannot take this scheme")


def _storable(scheme: str, shape: tuple[int, ...]) -> bool:
    """Whether transformers reads ``scheme``'s blocks of a ``shape`` tensor back (module doc); integer schemes
    have no such limit."""
    return scheme != "fp8-block" or all(d <= fp8_block.BLOCK or d % fp8_block.BLOCK == 0 for d in shape)


def fitting_group(group_size: int, sizes: list[int]) -> int:
    """The largest divisor of ``group_size`` that divides each of ``sizes`` (int4-group's groups tile every input)."""
    return functools.reduce(math.gcd, sizes, group_size)


def quantize_directory(path: str | Path, *, scheme: str = "fp8-block", group_size: int = compressed_experts.DEFAULT_GROUP,
                       source: Path | None = None, show_progress: bool = False, targets: str = "experts", fit_group: bool = False) -> dict:
    """Rewrite a saved checkpoint's expert weights with ``scheme``, in place (every shard, the index, the
    config), or, with ``source``, write ``source``'s shards into ``path``, which holds its other files already.
    Returns what the record keeps: the bytes before and after, the tensors quantized, the largest relative
    round-trip error. ``fit_group``: int4-group takes the largest divisor of ``group_size`` that divides every
    expert's input size (a pruned width the planner rounded to 8, say 576 for groups of 128, gets groups of 64)
    instead of refusing; the record keeps both sizes."""
    from safetensors import safe_open

    from moe_fx.formats.lazy import meta_model
    from moe_fx.formats.shards import rewrite_shards, set_quantization_config, shard_files

    fmt = codec(scheme, group_size)
    path = Path(path)
    shards = source or path  # its config is the one ``path`` holds
    config = json.loads((shards / "config.json").read_text())
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method")
        raise BadOptionError(f"{shards}: the checkpoint is already quantized ({method}); {scheme} needs a checkpoint in bfloat16/float16/float32")
    check_targets(targets)
    shapes = {}
    for file in shard_files(shards):
        with safe_open(str(shards / file), "pt") as f:
            shapes |= {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    asked = group_size
    if fit_group and scheme == "int4-group":
        group_size = fitting_group(group_size, [shapes[k][-1] for k in shapes if _EXPERT_WEIGHT.search(k)])
        fmt = codec(scheme, group_size)
    chosen, not_converted = plan_tensors(meta_model(shards), shapes, scheme, targets, group_size)
    worst = 0.0

    def encode(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        nonlocal worst
        out = {}
        for name, tensor in state.items():
            if name not in chosen:
                out[name] = tensor
                continue
            stored = fmt.encode(name, tensor)
            worst = max(worst, quantized.relative_error(tensor, fmt.decode(name, stored)))
            out.update(stored)
        return out

    before, after = rewrite_shards(path, encode, source=source, desc=scheme, show_progress=show_progress)
    set_quantization_config(path, fmt.config(not_converted))
    partial = sorted(k for k in chosen if scheme == "fp8-block" and any(d % fp8_block.BLOCK for d in shapes[k]))
    return {"scheme": scheme, "targets": targets, "tensors": len(chosen), "bytes_before": before, "bytes": after,
            "max_relative_error": worst, "kept_in_source_dtype": len(not_converted),
            **({"group_size": group_size} if scheme == "int4-group" else {}),
            **({"group_size_asked": asked} if group_size != asked else {}),
            **({"partial_blocks": {"tensors": len(partial), "example": partial[0], "shape": list(shapes[partial[0]])}} if partial else {})}


def partial_blocks_note(entry: dict) -> str | None:
    """What a quantization record's FP8 tensors of partial blocks (a dimension under 128: toy models) mean for
    the user: transformers reads them back on the CPU, but its GPU FP8 kernels take whole blocks only; None
    when every block is whole (every hub-sized model)."""
    partial = entry.get("partial_blocks")
    if not partial:
        return None
    return (f"note: {partial['tensors']} FP8 tensors have a dimension that is not a multiple of {fp8_block.BLOCK} (e.g. {partial['example']} "
            f"{partial['shape']}): transformers' GPU FP8 kernels refuse partial blocks, so stock transformers runs this checkpoint on the "
            "CPU only (dequantized); moe_fx.load runs it on any device")


def quantize_checkpoint(source: str | Path, out: str | Path, *, scheme: str = "fp8-block", group_size: int = compressed_experts.DEFAULT_GROUP,
                        overwrite: bool = False, show_progress: bool = False, targets: str = "experts") -> dict:
    """Write ``source`` (a checkpoint directory, pruned or not, left untouched) to ``out`` with ``scheme``'s
    experts, atomically; return the record's ``quantization`` entry (also written to ``out``'s ``moe_fx.json``)."""
    from moe_fx.formats.checkpoint import check_output_path
    from moe_fx.formats.loading import check_model_dir

    codec(scheme, group_size)  # a bad scheme or targets, or a missing library, before anything is written
    check_targets(targets)
    source = check_model_dir(source)
    return _write(source, check_output_path(out, source, overwrite), scheme, group_size, show_progress, targets)


def quantize_in_place(path: str | Path, *, scheme: str, group_size: int = compressed_experts.DEFAULT_GROUP, show_progress: bool = False,
                      targets: str = "experts", fit_group: bool = False) -> dict:
    """:func:`quantize_checkpoint` from ``path`` onto itself: the quantized copy is built beside it and replaces
    it only when complete (a streamed prune's output, quantized after it is written); ``fit_group`` as
    :func:`quantize_directory`'s."""
    codec(scheme, group_size)
    check_targets(targets)
    return _write(Path(path), Path(path), scheme, group_size, show_progress, targets, fit_group)


def _write(source: Path, out: Path, scheme: str, group_size: int, show_progress: bool, targets: str, fit_group: bool = False) -> dict:
    from moe_fx.formats.atomic import atomic_directory
    from moe_fx.formats.checkpoint import RECORD_FILE
    from moe_fx.formats.loading import stored_in_buckets
    from moe_fx.formats.shards import INDEX_FILE, shard_files

    if stored_in_buckets(source):
        raise BadOptionError(f"{source}: its experts are stored in width buckets, which no quantized checkpoint format holds; quantize it "
                             "in memory (moe_fx.load(path, quantize=SCHEME), moe-fx eval --quantize), or prune with --expert-storage padded, "
                             "then quantize")
    shards = {*shard_files(source), INDEX_FILE}
    with atomic_directory(out) as tmp:
        for item in source.iterdir():  # everything but the weights, which quantize_directory writes
            if item.name not in shards:
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        entry = quantize_directory(tmp, scheme=scheme, group_size=group_size, source=source, show_progress=show_progress, targets=targets,
                                   fit_group=fit_group)
        record_file = tmp / RECORD_FILE
        record = json.loads(record_file.read_text()) if record_file.is_file() else {"source": str(source.resolve())}
        record["quantization"] = entry
        record_file.write_text(json.dumps(record, indent=2) + "\n")
    return entry
