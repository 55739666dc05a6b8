"""Rewriting a saved checkpoint's safetensors shards in place, one shard in memory at a time: what the formats
that re-encode weights after saving (MXFP4 experts, block-wise FP8) share."""

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


def _bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def rewrite_shards(path: Path, transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], *,
                   desc: str = "rewriting", show_progress: bool = False) -> tuple[int, int]:
    """Replace every shard's tensors by ``transform(tensors)`` and the index's weight map and total size to match;
    return the tensor bytes before and after. ``show_progress``: a bar over the shards' bytes."""
    from safetensors.torch import load_file, save_file

    from moe_fx.progress import progress_bar

    before = after = 0
    weight_map = {}
    files = shard_files(path)
    with progress_bar(desc, total=sum((path / f).stat().st_size for f in files), unit="B", enabled=show_progress) as bar:
        for file in files:
            size = (path / file).stat().st_size
            state = load_file(path / file)
            before += _bytes(state)
            out = transform(state)
            after += _bytes(out)
            save_file(out, path / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(out, file))
            bar.update(size)
    index_file = path / INDEX_FILE
    if index_file.is_file():
        index = json.loads(index_file.read_text())
        index["weight_map"], index["metadata"]["total_size"] = weight_map, after
        index_file.write_text(json.dumps(index, indent=2) + "\n")
    return before, after


def set_quantization_config(path: Path, quantization_config: dict) -> None:
    """Write ``quantization_config`` into the checkpoint's ``config.json``."""
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = quantization_config
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
