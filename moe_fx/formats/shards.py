"""A checkpoint's safetensors shards: their headers read without loading a tensor, and their rewriting in place, one
shard in memory at a time (what the formats that re-encode weights after saving, MXFP4 experts and block-wise FP8,
share)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

INDEX_FILE = "model.safetensors.index.json"


def shard_files(path: Path) -> list[str]:
    """The checkpoint's shard file names (the index's, or the single ``model.safetensors``)."""
    index_file = path / INDEX_FILE
    if index_file.is_file():
        return sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
    return ["model.safetensors"]


def safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """The tensor entries of the safetensors file at ``path`` (``dtype``, ``shape``, ``data_offsets`` relative to the
    data section; the ``__metadata__`` entry left out) and the data section's offset in the file."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {k: v for k, v in header.items() if k != "__metadata__"}, 8 + size


def tensor_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of the tensors of ``state``."""
    return sum(t.numel() * t.element_size() for t in state.values())


def rewrite_shards(path: Path, transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], *, source: Path | None = None,
                   desc: str = "rewriting", show_progress: bool = False) -> tuple[int, int]:
    """Write every shard's tensors as ``transform(tensors)`` into ``path``, and the index's weight map and total size
    to match; the shards are read from ``source`` (another checkpoint, so each byte is read and written once) or
    from ``path`` itself. Returns the tensor bytes before and after. ``show_progress``: a bar over the shards' bytes."""
    from safetensors.torch import load_file, save_file

    from moe_fx.progress import progress_bar

    source = source or path
    before = after = 0
    weight_map = {}
    files = shard_files(source)
    with progress_bar(desc, total=sum((source / f).stat().st_size for f in files), unit="B", enabled=show_progress) as bar:
        for file in files:
            size = (source / file).stat().st_size
            state = load_file(source / file)
            before += tensor_bytes(state)
            out = transform(state)
            after += tensor_bytes(out)
            save_file(out, path / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(out, file))
            bar.update(size)
    if (source / INDEX_FILE).is_file():
        index = json.loads((source / INDEX_FILE).read_text())
        index["weight_map"], index["metadata"]["total_size"] = weight_map, after
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return before, after


def set_quantization_config(path: Path, quantization_config: dict) -> None:
    """Write ``quantization_config`` into the checkpoint's ``config.json``."""
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = quantization_config
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
