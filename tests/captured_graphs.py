"""Dynamo graphs of tiny models as a CUDA machine would capture them, for the tests of graph rewrites that apply
only on CUDA (``moe_fx::topk_rows``, ``moe_fx::decode_attention``) and run on CPUs."""

from __future__ import annotations

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode


def _on_fake_cuda(value):
    """``value``'s tensors as fake CUDA tensors of the same shape, strides and dtype."""
    if isinstance(value, (tuple, list)):
        return type(value)(_on_fake_cuda(v) for v in value)
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="cuda")
    return value


@torch.no_grad()
def captured_on_cuda(model: torch.nn.Module, **call) -> tuple[fx.GraphModule, list]:
    """The whole-model Dynamo graph of ``model(**call)`` (captured on the CPU) and its example inputs, with the
    example values Dynamo recorded turned into fake CUDA tensors: what the rewrites see on a GPU."""
    captured = {}

    def capture(gm, example_inputs):
        captured.update(gm=gm, inputs=example_inputs)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=capture, fullgraph=True)(**call)
    gm = captured["gm"]
    with FakeTensorMode(allow_non_fake_inputs=True):
        for node in gm.graph.nodes:
            if "example_value" in node.meta:
                node.meta["example_value"] = _on_fake_cuda(node.meta["example_value"])
    return gm, captured["inputs"]
