"""``moe_fx::topk_rows``: the router's top-k over a few hundred experts as one small kernel (CUDA, Triton).

torch's ``topk`` on a ``[T, E]`` router output runs a sort and a gather (two kernels, about 9.5 us a layer at
batch 1 on an H200 for 128 experts: more than attention). Each row here is one program that holds the row in
registers and takes its maximum ``k`` times. Values are the row's own entries (bit-identical to torch's);
indices are the same except among equal values, which torch leaves unordered and this kernel orders by index.
:func:`replace_topk` swaps it in for every eligible ``torch.topk`` of a captured graph (:func:`moe_fx.compile`
does, on CUDA); a ``triton_op``, so Inductor launches the kernel from its own code.

Most routers take the top-k of a softmax and many renormalize the ``k`` picks (Qwen, Mixtral, OLMoE:
``softmax -> topk -> values / values.sum(-1, keepdim=True)``): three more small kernels a layer at batch 1
(softmax, the sum, the division). Where the graph has that shape, ``moe_fx::softmax_topk_rows`` computes the
softmax in the same program (fp32, as the routers ask) and divides the picks by their sum there: one kernel for the
chain. Its values differ from torch's by rounding (the softmax's and the sum's order: 3e-8 for fp32 scores).
"""

from __future__ import annotations

import operator

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


def _softmax_topk_rows(x: torch.Tensor, k: int, normalize: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(torch.softmax(x, -1, dtype=dtype), k)``, the values divided by their sum when ``normalize``."""
    from moe_fx.kernels.triton_kernels import triton_topk_rows

    rows = x.reshape(-1, x.shape[-1])
    values, indices = triton_topk_rows(rows if rows.stride(-1) == 1 else rows.contiguous(), k, True, normalize, dtype)
    return values.view(*x.shape[:-1], k), indices.view(*x.shape[:-1], k)


softmax_topk_rows = grouped_mm.triton_op("moe_fx::softmax_topk_rows", _softmax_topk_rows)


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
_SOFTMAX_ARGS = ("input", "dim", "_stacklevel", "dtype")
_SOFTMAXES = (torch.softmax, torch.nn.functional.softmax, torch.special.softmax)
_DIVISIONS = (operator.truediv, operator.itruediv, torch.div, torch.true_divide)


def bound_args(node: fx.Node, names: tuple[str, ...]) -> dict:
    """A captured call's arguments by name (``names`` in signature order; a method call's object first)."""
    args = node.args[1:] if node.op == "call_method" else node.args
    first = {names[0]: node.args[0]} if node.op == "call_method" and node.args else {}
    return first | dict(zip(names[bool(first):], args)) | dict(node.kwargs)


def example_value(node: object) -> torch.Tensor | None:
    """The (fake) value Dynamo recorded for ``node``, or ``None`` (not a node, or none recorded)."""
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


def _is_last_dim(value: torch.Tensor | None, dim: object) -> bool:
    return value is not None and isinstance(dim, int) and dim in (-1, value.ndim - 1)


def _softmax_of(node: object) -> tuple[fx.Node, torch.dtype] | None:
    """``(logits, dtype)`` where ``node`` is a last-dimension softmax of ``logits`` computed in ``dtype``."""
    if not isinstance(node, fx.Node) or not (node.op == "call_function" and node.target in _SOFTMAXES
                                              or node.op == "call_method" and node.target == "softmax"):
        return None
    bound = bound_args(node, _SOFTMAX_ARGS)
    logits, out = bound.get("input"), example_value(node)
    if set(bound) - set(_SOFTMAX_ARGS) or not isinstance(logits, fx.Node) or not _is_last_dim(out, bound.get("dim")):
        return None
    return logits, out.dtype


def _renormalization(values: fx.Node) -> fx.Node | None:
    """The node computing ``values / values.sum(-1, keepdim=True)`` where those two are ``values``' only uses."""
    users = list(values.users)
    total = next((u for u in users if u.op == "call_method" and u.target == "sum" or u.op == "call_function" and u.target is torch.sum), None)
    if len(users) != 2 or total is None or len(total.users) != 1:
        return None
    division = next(iter(total.users))
    bound = bound_args(total, ("input", "dim", "keepdim"))
    if (set(bound) - {"input", "dim", "keepdim"} or bound.get("keepdim") is not True or not _is_last_dim(example_value(values), bound.get("dim"))
            or division not in users or division.args[:2] != (values, total) or division.kwargs):
        return None
    is_division = division.op == "call_function" and division.target in _DIVISIONS or division.op == "call_method" and division.target in ("div", "div_")
    return division if is_division else None


def replace_call(gm: fx.GraphModule, node: fx.Node, target: object, args: tuple) -> fx.Node:
    """Put a call of ``target(*args)`` in ``node``'s place (its users and recorded example value move to it)."""
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, args)
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def replace_topk(gm: fx.GraphModule) -> int:
    """Replace every eligible ``torch.topk`` / ``Tensor.topk`` of a Dynamo graph by ``moe_fx::topk_rows``, or, where
    it takes a softmax's top-k, by ``moe_fx::softmax_topk_rows`` over the logits (with the picks' renormalization
    where it follows); the example values Dynamo records say which calls are eligible. Returns how many were replaced."""
    replaced = 0
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target is torch.topk or node.op == "call_method" and node.target == "topk"):
            continue
        bound = bound_args(node, _TOPK_ARGS)
        x = bound.get("input")
        if set(bound) - set(_TOPK_ARGS) or not eligible(example_value(x), bound.get("k"), bound.get("dim", -1), bound.get("largest", True)):
            continue
        softmax = _softmax_of(x)
        if softmax is not None and not eligible(example_value(softmax[0]), bound["k"]):
            softmax = None
        if softmax is None:
            replace_call(gm, node, torch.ops.moe_fx.topk_rows.default, (x, bound["k"]))
        else:
            fused = replace_call(gm, node, torch.ops.moe_fx.softmax_topk_rows.default, (softmax[0], bound["k"], False, softmax[1]))
            _fold_renormalization(gm, fused)
            if not x.users:
                gm.graph.erase_node(x)
        replaced += 1
    if replaced:
        gm.graph.lint()
        gm.recompile()
    return replaced


def _fold_renormalization(gm: fx.GraphModule, fused: fx.Node) -> None:
    """Where ``fused``'s values are only divided by their sum, have the kernel divide (its ``normalize``)."""
    values = next((u for u in fused.users if u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0), None)
    division = None if values is None or example_value(values) is None or example_value(values).dtype != torch.float32 else _renormalization(values)
    if division is None:
        return
    total = division.args[1]
    fused.args = (*fused.args[:2], True, *fused.args[3:])
    division.replace_all_uses_with(values)
    gm.graph.erase_node(division)
    gm.graph.erase_node(total)
