"""Read the next decoder layer's bytes into the page cache while the current layer computes.

A streamed prune loads a layer from memory-mapped safetensors files: from a cold disk the page faults of that load
stall the layer loop for as long as the disk takes to deliver the layer (1.2 GB a layer of Qwen3-30B-A3B, 11 GB
of DeepSeek-V3). :class:`ReadAhead` reads the byte ranges of the next layer's tensors on one worker thread (the
reads release the GIL), so the load that follows finds them cached. It costs no process memory (one 8 MiB buffer;
the page cache is the kernel's) and changes no result: the load still reads the files through the same maps.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from moe_fx.formats.shards import safetensors_header

_CHUNK = 8 << 20


def tensor_ranges(path: Path) -> dict[str, tuple[int, int]]:
    """Each tensor's ``[start, end)`` byte range in the safetensors file at ``path`` (its header says where)."""
    entries, base = safetensors_header(path)
    return {k: (base + v["data_offsets"][0], base + v["data_offsets"][1]) for k, v in entries.items()}


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``ranges`` sorted, with touching or overlapping ones joined (a layer's tensors are mostly contiguous)."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def _read(path: Path, ranges: list[tuple[int, int]]) -> None:
    buffer = bytearray(_CHUNK)
    fd = os.open(path, os.O_RDONLY)
    try:
        for start, end in ranges:
            for offset in range(start, end, _CHUNK):
                os.preadv(fd, [memoryview(buffer)[: min(_CHUNK, end - offset)]], offset)
    finally:
        os.close(fd)


class ReadAhead:
    """One worker thread reading tensors' bytes of safetensors files ahead of their use (see the module doc)."""

    def __init__(self, files: Iterable[Path]) -> None:
        self._where = {key: (path, span) for path in files for key, span in tensor_ranges(path).items()}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="moe-fx-read-ahead")

    def start(self, keys: Iterable[str]) -> None:
        """Begin reading ``keys``' bytes in the background (after any read already started)."""
        by_file: dict[Path, list[tuple[int, int]]] = {}
        for key in keys:
            path, span = self._where[key]
            by_file.setdefault(path, []).append(span)
        self._pool.submit(lambda: [_read(path, _merged(spans)) for path, spans in by_file.items()])

    def close(self) -> None:
        """Wait for the read in flight (a read that failed only loses its head start: the load reads the file again)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
