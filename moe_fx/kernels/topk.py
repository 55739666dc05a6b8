"""``moe_fx::topk_rows``: the router's top-k over a few hundred experts as one small kernel (CUDA, Triton).

torch's ``topk`` on a ``[T, E]`` router output runs a sort and a gather (two kernels, about 9.5 us a layer at
batch 1 on an H200 for 128 experts: more than attention). Each row here is one program that holds the row in
registers and takes its maximum ``k`` times. Values are the row's own entries (bit-identical to torch's);
indices are the same except among equal values, which torch leaves unordered and this kernel orders by index.
:func:`replace_topk` swaps it in for every eligible ``torch.topk`` of a captured graph (:func:`moe_fx.compile`
does, on CUDA); a ``triton_op``, so Inductor launches the kernel from its own code.
"""

from __future__ import annotations

import torch
from torch import fx

from moe_fx.kernels import grouped_mm

MAX_WIDTH = 1024
"""Widest row the kernel takes (a row lives in one program's registers); router widths are 8-512 experts."""
MAX_K = 32
"""Largest ``k`` (the selection loop is unrolled ``k`` times); routers take 1-22."""


def _topk_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(x, k, dim=-1)`` for any leading shape, on the Triton kernel."""
    from moe_fx.kernels.triton_kernels import triton_topk_rows

    rows = x.reshape(-1, x.shape[-1])
    values, indices = triton_topk_rows(rows if rows.stride(-1) == 1 else rows.contiguous(), k)
    return values.view(*x.shape[:-1], k), indices.view(*x.shape[:-1], k)


topk_rows = grouped_mm.triton_op("moe_fx::topk_rows", _topk_rows)


def eligible(x: torch.Tensor, k: object, dim: object = -1, largest: object = True) -> bool:
    """Whether ``torch.topk(x, k, dim, largest)`` (``x`` a real or fake tensor) can run on the kernel: the last
    dimension of a floating CUDA tensor of static width up to :data:`MAX_WIDTH`, ``k`` static up to :data:`MAX_K`,
    largest first (sorted or not: the kernel's order is sorted)."""
    if not isinstance(x, torch.Tensor) or x.device.type != "cuda" or not x.dtype.is_floating_point or x.ndim == 0:
        return False
    width = x.shape[-1]
    last = isinstance(dim, int) and dim in (-1, x.ndim - 1)
    return (last and largest is True and isinstance(k, int) and 0 < k <= MAX_K and isinstance(width, int)
            and k <= width <= MAX_WIDTH and grouped_mm.triton_available())


_TOPK_ARGS = ("input", "k", "dim", "largest", "sorted")


def replace_topk(gm: fx.GraphModule) -> int:
    """Replace every eligible ``torch.topk`` / ``Tensor.topk`` of a Dynamo graph by ``moe_fx::topk_rows`` (the
    example values Dynamo records say whether one is); returns how many were replaced."""
    replaced = 0
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target is torch.topk or node.op == "call_method" and node.target == "topk"):
            continue
        bound = dict(zip(_TOPK_ARGS, node.args)) | dict(node.kwargs)
        x = bound.get("input")
        value = x.meta.get("example_value") if isinstance(x, fx.Node) else None
        if set(bound) - set(_TOPK_ARGS) or not eligible(value, bound.get("k"), bound.get("dim", -1), bound.get("largest", True)):
            continue
        with gm.graph.inserting_before(node):
            fused = gm.graph.call_function(torch.ops.moe_fx.topk_rows.default, (x, bound["k"]))
        fused.meta.update(node.meta)
        node.replace_all_uses_with(fused)
        gm.graph.erase_node(node)
        replaced += 1
    if replaced:
        gm.graph.lint()
        gm.recompile()
    return replaced
