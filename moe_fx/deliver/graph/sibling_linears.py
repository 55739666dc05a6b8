"""Sibling projections (q/k/v, a dense MLP's gate/up) as one matmul in compiled inference graphs.

At batch 1 each projection is a matrix-vector product that does not fill the GPU: Qwen3-30B-A3B's q, k and v
take 7.2 + 5.3 + 5.3 us on an H200 where one product over their stacked weights takes 8.0 us
(``benchmarks/decode_kernels.py``). Stacking needs the weights in one tensor without a copy per step, so:

- :func:`pack_sibling_linears` (``moe_fx.compile`` calls it) moves the weights (and biases) of the plain
  ``nn.Linear`` children of one module that take inputs of the same width into one tensor each, and points
  every ``weight`` at its rows. Values, names, ``state_dict`` and in-place updates are unchanged; memory is
  unchanged once the old tensors are freed; saved checkpoints are the same (transformers' and moe-fx's
  writers store such views as separate tensors).
- :func:`fuse_sibling_linears` (the compile backend runs it on graphs traced without gradients) replaces the
  ``linear`` calls of one input whose weights lie next to each other in such a tensor by one ``linear`` over
  their rows and a split. The stacked rows enter the graph as a buffer viewing the same memory, so the
  compiled graph reads the model's weights, never a copy made at compile time.

Graphs traced with gradients keep their calls: the buffer carries no gradient to the parameters.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from moe_fx.deliver.graph.names import tensor_name
from moe_fx.deliver.graph.rewrite import constant


def _group_key(linear: nn.Linear) -> tuple:
    w = linear.weight
    return w.shape[1], w.dtype, w.device, linear.bias is None, w.requires_grad


def _adjacent(tensors: list[torch.Tensor]) -> bool:
    """Whether ``tensors`` are contiguous and lie one after another in one storage, in this order."""
    first = tensors[0]
    if not all(t.is_contiguous() and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() for t in tensors):
        return False
    return all(b.data_ptr() == a.data_ptr() + a.numel() * a.element_size() for a, b in zip(tensors, tensors[1:]))


@torch.no_grad()
def _pack(tensors: list[nn.Parameter]) -> None:
    """Copy ``tensors`` (same trailing shape) into one new tensor and point each at its rows."""
    if _adjacent(tensors):
        return
    packed = torch.cat([t.detach() for t in tensors])
    start = 0
    for t in tensors:
        t.data = packed[start:start + t.shape[0]]
        start += t.shape[0]


def pack_sibling_linears(model: nn.Module) -> int:
    """Pack each group of two or more plain ``nn.Linear`` children of one module with the same input width, dtype,
    device, bias presence and ``requires_grad`` (see the module doc); returns the number of groups (idempotent)."""
    groups = 0
    for module in model.modules():
        by_key: dict[tuple, list[nn.Linear]] = {}
        for child in module.children():
            if type(child) is nn.Linear and child.weight.device.type != "meta":  # meta: offloaded, its hooks own the data
                by_key.setdefault(_group_key(child), []).append(child)
        for linears in by_key.values():
            if len(linears) > 1:
                _pack([lin.weight for lin in linears])
                if linears[0].bias is not None:
                    _pack([lin.bias for lin in linears])
                groups += 1
    return groups


Call = tuple[fx.Node, torch.Tensor, "torch.Tensor | None"]
"""A ``linear`` node of the graph with the model's weight and bias it reads."""


def _linear_parts(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None] | None:
    """``(input, weight, bias)`` nodes of a ``F.linear`` call whose weight (and bias) are lifted model tensors."""
    if node.op != "call_function" or node.target is not F.linear or len(node.args) < 2 or set(node.kwargs) - {"bias"}:
        return None
    x, w = node.args[:2]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if not isinstance(x, fx.Node) or not isinstance(w, fx.Node) or tensor_name(w) is None:
        return None
    if b is not None and (not isinstance(b, fx.Node) or tensor_name(b) is None):
        return None
    return x, w, b


def _rows_view(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One tensor over the adjacent ``tensors``' memory (their rows, stacked): a view, no copy."""
    first = tensors[0]
    shape = (sum(t.shape[0] for t in tensors), *first.shape[1:])
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), shape, first.stride())


def fuse_sibling_linears(gm: fx.GraphModule, model: nn.Module) -> int:
    """Replace each run of ``linear`` calls on one input whose weights (and biases) are adjacent rows of one
    tensor by one call and a split (see the module doc); returns the number of calls removed."""
    by_input: dict[tuple, list[Call]] = {}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        parts = _linear_parts(node)
        if parts is None:
            continue
        x, w, b = parts
        try:
            weight = model.get_parameter(tensor_name(w))
            bias = model.get_parameter(tensor_name(b)) if b is not None else None
        except AttributeError:  # a buffer, or a name this model does not hold
            continue
        by_input.setdefault((x, b is None), []).append((node, weight, bias))
    removed = 0
    for (x, _), calls in by_input.items():
        calls.sort(key=lambda c: c[1].data_ptr())
        run: list[Call] = []
        for call in calls + [None]:
            if call is not None and (not run or _follows(run[-1], call)):
                run.append(call)
                continue
            if len(run) > 1:
                _fuse(gm, x, run, min((node for node, _, _ in run), key=order.get))
                removed += len(run) - 1
            run = [call] if call is not None else []
    if removed:
        gm.graph.lint()
        gm.recompile()
    return removed


def _follows(previous: Call, call: Call) -> bool:
    """Whether ``call``'s weight (and bias) are the rows right after ``previous``'s."""
    return _adjacent([previous[1], call[1]]) and (call[2] is None or _adjacent([previous[2], call[2]]))


def _fuse(gm: fx.GraphModule, x: fx.Node, run: list[Call], first: fx.Node) -> None:
    """One ``linear`` over the run's stacked weights, placed before ``first`` (its earliest call in the graph),
    split into the calls' outputs."""
    graph = gm.graph
    stem = "moe_fx_stacked_" + tensor_name(run[0][0].args[1]).replace(".", "_")
    weight = constant(gm, stem + "_weight", _rows_view([w for _, w, _ in run]), before=first)
    bias = constant(gm, stem + "_bias", _rows_view([b for _, _, b in run]), before=first) if run[0][2] is not None else None
    with graph.inserting_before(first):
        out = graph.call_function(F.linear, (x, weight, bias))
        pieces = graph.call_function(torch.split, (out, [w.shape[0] for _, w, _ in run]), {"dim": -1})
        parts = [graph.call_function(operator.getitem, (pieces, i)) for i in range(len(run))]
    for piece, (node, _, _) in zip(parts, run):
        piece.meta.update({k: node.meta[k] for k in ("nn_module_stack", "example_value", "stack_trace") if k in node.meta})
        node.replace_all_uses_with(piece)
        graph.erase_node(node)
