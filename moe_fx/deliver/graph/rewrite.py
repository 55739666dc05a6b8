"""Graph edits shared by the MoE graph passes: swap a matched experts computation for one call, add tensors.

The call placed in the graph is a plain Python function over graph values. Inductor's AOTAutograd traces
through it like any other code, so it may run a module's own forward: the module's tensors are swapped for the
graph's values of them for the call (``torch.func.functional_call``'s mechanism), which keeps the weights graph
inputs (never constants baked into the compiled code) and lets the same compiled graph see updated weights.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch
from torch import fx, nn
from torch.nn.utils.stateless import _reparametrize_module

from moe_fx.deliver.graph.match import GraphMoEBlock


class GraphCall:
    """A callable placed in an FX graph: it carries the ``__name__``/``__module__`` that FX's code generator names
    its targets by (a closure or ``functools.partial`` has none)."""

    def __init__(self, name: str, fn: Callable[..., torch.Tensor]) -> None:
        self.__name__ = self.__qualname__ = name
        self.__module__ = __name__
        self.fn = fn

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        return self.fn(*args)

    def __repr__(self) -> str:
        return self.__name__


def with_tensors(root: nn.Module, names: Sequence[str], fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``call(*tensors, *args)``: ``fn(*args)`` with ``root``'s tensors ``names`` replaced by ``tensors`` meanwhile."""
    names = list(names)

    def call(*values: torch.Tensor) -> torch.Tensor:
        with _reparametrize_module(root, dict(zip(names, values[: len(names)]))):
            return fn(*values[len(names):])

    return call


def _copy_meta(source: fx.Node, target: fx.Node) -> None:
    """What later matches read of a node (its module stack, example value), for the node standing in for it."""
    target.meta.update({k: source.meta[k] for k in ("nn_module_stack", "example_value", "stack_trace") if k in source.meta})


def attr_name(block: GraphMoEBlock, what: str) -> str:
    """A graph attribute name for ``block``'s tensor ``what``, unique across blocks (the block's path in it)."""
    return "moe_fx_" + block.path.replace(".", "_") + "_" + what


def replace_experts(gm: fx.GraphModule, block: GraphMoEBlock, name: str, fn: Callable[..., torch.Tensor], args: Sequence[fx.Node]) -> fx.Node:
    """Replace ``block``'s experts region by ``fn(*args)`` (same ``[T, H]`` output) and erase the region.

    The new node keeps the region output's module stack, so a later match finds it as the experts computation.
    Region nodes still used outside (symbolic sizes, with dynamic shapes) stay."""
    graph = gm.graph
    with graph.inserting_before(block.output):
        new = graph.call_function(GraphCall(name, fn), tuple(args))
    _copy_meta(block.output, new)
    block.output.replace_all_uses_with(new)
    for node in reversed(block.region):
        if not node.users:
            graph.erase_node(node)
    return new


def constant(gm: fx.GraphModule, name: str, tensor: torch.Tensor, *, before: fx.Node, stands_for: str | None = None) -> fx.Node:
    """A ``get_attr`` node for ``tensor``, registered as a buffer of ``gm`` (so AOTAutograd lifts it to an input);
    ``stands_for``: the model tensor it replaces, recorded for later matches. A Dynamo graph records a source for
    each of its attributes (``_param_name_to_source``, which AOTAutograd requires); the buffer gets its own."""
    gm.register_buffer(name, tensor)
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is not None:
        from torch._dynamo.source import ConstantSource

        sources[name] = ConstantSource(f"moe_fx.{name}")
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["example_value"] = tensor
    if stands_for is not None:
        node.meta["moe_fx_tensor"] = stands_for
    return node


def add_after(gm: fx.GraphModule, node: fx.Node, addend: fx.Node) -> fx.Node:
    """``node + addend`` in place of ``node`` for all of its users; ``addend`` lies between ``node`` and its users."""
    with gm.graph.inserting_after(addend):
        total = gm.graph.call_function(operator.add, (node, addend))
    _copy_meta(node, total)
    node.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)
    return total
