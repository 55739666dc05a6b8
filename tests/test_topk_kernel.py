"""``moe_fx::topk_rows`` swapped in for torch's top-k, and ``moe_fx::softmax_topk_rows`` for a router's softmax ->
top-k (-> renormalization): which calls of a captured graph qualify, that the graph keeps its outputs' structure,
and, on real families' Dynamo graphs, that the rewired graph computes the same logits (``test_sibling_linears.py``
checks that ``moe_fx.compile`` runs the rewrite). The kernel's arithmetic runs in Triton's interpreter
(``test_quantized_kernels_interpreted.py``) and, on a GPU, in compiled tiny models against eager (``scripts/test_gpu.sh``);
the decode benchmark compiles with it (``benchmarks/decode.py``, variant options ``fused=off`` and
``softmax-topk=off`` for the side-by-side)."""

from __future__ import annotations

import operator

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


def _reference_softmax_topk(x, k, normalize, dtype):
    values, indices = torch.topk(torch.softmax(x, -1, dtype=dtype), k)
    return (values / values.sum(-1, keepdim=True) if normalize else values), indices


# (family, routers' top-k calls, how many of them take a softmax's top-k, whether those renormalize)
ROUTER_GRAPHS = [
    ("mixtral", 2, 2, True),
    ("qwen3_moe", 2, 2, False),  # tiny config: norm_topk_prob=False
    ("qwen2_moe", 2, 2, True),
    ("olmoe", 2, 2, True),
    ("gpt_oss", 2, 0, False),  # top-k of the logits, softmax after
    ("deepseek_v3", 6, 0, False),  # sigmoid scores; group-limited: the groups' top-2, the best groups, the experts
]


@pytest.mark.parametrize(("family", "calls", "softmaxes", "normalized"), ROUTER_GRAPHS)
def test_router_chains_of_real_graphs(with_triton, family, calls, softmaxes, normalized) -> None:
    """Each family's router as Dynamo captures it: which top-k calls fuse their softmax (and renormalization), and
    the rewritten graph, with the fused operator computed by torch, returns the same logits (the rewiring is right)."""
    from captured_graphs import captured_on_cuda
    from tiny_models import tiny_model

    model = tiny_model(family).eval()
    ids = torch.randint(3, model.config.get_text_config().vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gm, inputs = captured_on_cuda(model, input_ids=ids)
        want = gm(*inputs)
        assert topk.replace_topk(gm) == calls
        fused = [n for n in gm.graph.nodes if n.target is torch.ops.moe_fx.softmax_topk_rows.default]
        assert len(fused) == softmaxes and all(n.args[2] is normalized for n in fused)
        assert all(n.args[3] == torch.float32 for n in fused)
        assert sum(n.target is torch.ops.moe_fx.topk_rows.default for n in gm.graph.nodes) == calls - softmaxes
        for node in gm.graph.nodes:
            if node.target is torch.ops.moe_fx.softmax_topk_rows.default:
                node.target = _reference_softmax_topk
            elif node.target is torch.ops.moe_fx.topk_rows.default:
                node.target = torch.topk
        gm.recompile()
        got = gm(*inputs)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def _chain(renormalize) -> fx.GraphModule:
    """``softmax -> topk -> renormalize(values)`` traced, example values on CUDA, fp32 scores."""
    def f(x):
        values, indices = torch.topk(torch.softmax(x, -1, dtype=torch.float32), 4)
        return renormalize(values), indices

    gm = fx.symbolic_trace(f)
    with FakeTensorMode(allow_non_fake_inputs=True):
        for node in gm.graph.nodes:
            node.meta["example_value"] = torch.empty(3, 16 if node.op == "placeholder" else 4, device="cuda")
    return gm


@pytest.mark.parametrize(("renormalize", "folded"), [
    (lambda v: v / v.sum(-1, keepdim=True), True),
    (lambda v: torch.div(v, torch.sum(v, dim=-1, keepdim=True)), True),
    (lambda v: v / v.sum(-1), False),  # no keepdim: another shape
    (lambda v: v / v.sum(0, keepdim=True), False),  # another dimension
    (lambda v: (v / v.sum(-1, keepdim=True), v), False),  # the picks are used as they are too
    (lambda v: v * 2.0, False),
])
def test_renormalization_folds_only_where_exact(with_triton, renormalize, folded) -> None:
    gm = _chain(renormalize)
    assert topk.replace_topk(gm) == 1
    fused = next(n for n in gm.graph.nodes if n.target is torch.ops.moe_fx.softmax_topk_rows.default)
    assert fused.args[2] is folded
    if folded:  # the sum and the division are gone
        assert not {torch.sum, torch.div, operator.truediv, "sum"} & {n.target for n in gm.graph.nodes}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/test_gpu.sh)")
@pytest.mark.parametrize(("family", "normalized"), [("mixtral", True), ("qwen3_moe", False), ("gpt_oss", None)])
def test_compiled_model_on_cuda_matches_eager(monkeypatch, family, normalized) -> None:
    """``moe_fx.compile`` on a GPU: the routers' chains run on the fused kernels and the logits match eager's."""
    from tiny_models import tiny_model

    import moe_fx
    from moe_fx.deliver import compile as compile_module

    seen = []

    def spy(gm):
        replaced = topk.replace_topk(gm)
        seen.extend(n.args[2] for n in gm.graph.nodes if n.target is torch.ops.moe_fx.softmax_topk_rows.default)
        return replaced

    monkeypatch.setattr(compile_module, "replace_topk", spy)
    model = tiny_model(family).cuda().eval()
    ids = torch.randint(3, model.config.get_text_config().vocab_size, (3, 9), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        torch._dynamo.reset()
        got = moe_fx.compile(model)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert seen == ([] if normalized is None else [normalized] * 2)
