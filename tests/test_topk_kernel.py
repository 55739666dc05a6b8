"""``moe_fx::topk_rows`` swapped in for torch's top-k: which calls of a captured graph qualify and that the graph
keeps its outputs' structure (``test_sibling_linears.py`` checks that ``moe_fx.compile`` runs it). The kernel's
arithmetic runs in Triton's interpreter (``test_quantized_kernels_interpreted.py``); on CUDA, the decode
benchmark compiles with it (``benchmarks/decode.py``, variant option ``topk=off`` for the side-by-side)."""

from __future__ import annotations

import pytest
import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

from moe_fx.kernels import grouped_mm, topk


def _graph(shape: tuple[int, ...], device: str, **topk_kwargs) -> fx.GraphModule:
    """``softmax -> topk -> (values.sum, indices)`` traced, with the example value Dynamo would record."""
    def f(x):
        out = torch.topk(torch.softmax(x, -1), **topk_kwargs)
        return out[0].sum(-1), out[1]

    gm = fx.symbolic_trace(f)
    with FakeTensorMode(allow_non_fake_inputs=True):
        value = torch.empty(shape, device=device)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.softmax:
            node.meta["example_value"] = value
    return gm


def _targets(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.fixture
def with_triton(monkeypatch):
    monkeypatch.setattr(grouped_mm, "triton_available", lambda: True)


@pytest.mark.parametrize("kwargs", [{"k": 8}, {"k": 8, "dim": -1}, {"k": 8, "dim": 1, "sorted": False}])
def test_router_topk_is_replaced(with_triton, kwargs) -> None:
    gm = _graph((3, 128), "cuda", **kwargs)
    assert topk.replace_topk(gm) == 1
    targets = _targets(gm)
    assert torch.ops.moe_fx.topk_rows.default in targets and torch.topk not in targets
    fused = next(n for n in gm.graph.nodes if n.target is torch.ops.moe_fx.topk_rows.default)
    assert fused.args[1] == 8 and all(u.args[1] in (0, 1) for u in fused.users)  # both outputs, by index


@pytest.mark.parametrize(("shape", "device", "kwargs"), [
    ((3, 128), "cpu", {"k": 8}),  # not CUDA
    ((3, 128), "cuda", {"k": 8, "dim": 0}),  # not the last dimension
    ((3, 128), "cuda", {"k": 8, "largest": False}),
    ((3, 2048), "cuda", {"k": 8}),  # wider than a program holds
    ((3, 128), "cuda", {"k": 33}),  # more picks than the unrolled loop
])
def test_other_topk_calls_stay(with_triton, shape, device, kwargs) -> None:
    gm = _graph(shape, device, **kwargs)
    assert topk.replace_topk(gm) == 0
    assert torch.topk in _targets(gm)


def test_no_triton_no_replacement(monkeypatch) -> None:
    monkeypatch.setattr(grouped_mm, "triton_available", lambda: False)
    assert topk.replace_topk(_graph((1, 128), "cuda", k=8)) == 0
