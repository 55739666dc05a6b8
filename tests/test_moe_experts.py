"""The ``moe_fx`` experts implementation: equality with transformers' eager experts for every family and
layout (1, few and many tokens; fp32 and bf16), its export path, whole-graph compilation, gradients, the
memory bound, and the Triton kernels (through Triton's CPU interpreter, where Triton is installed)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import NO_INTERPRETER, interpreter_env
from tiny_models import TINY_FAMILIES, first_experts_call, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

import moe_fx
from moe_fx.errors import BadOptionError
from moe_fx.kernels import distinct_forward, moe_fx_experts_forward
from moe_fx.kernels.implementation import set_implementation

TOKENS = (1, 3, 40)
"""One token (decode), a few, and more (pairs) than experts, so some experts get several rows."""


def _switchable(family: str):
    model = tiny_model(family)
    if not model._can_set_experts_implementation():
        pytest.skip(f"{family} has no switchable experts implementation")
    return model


@torch.no_grad()
def _logits(model, ids: torch.Tensor, impl: str) -> torch.Tensor:
    set_implementation(model, impl)
    return model(input_ids=ids, use_cache=False).logits.float()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_equals_eager_for_every_family(family: str) -> None:
    model = _switchable(family)
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 0.1)):
        model.to(dtype)
        for n in TOKENS:
            ids = torch.randint(3, 100, (1, n))
            try:
                ref = _logits(model, ids, "eager")
            except RuntimeError:  # a family whose own bf16 code mixes dtypes (inkling2): nothing to compare
                break
            if not torch.isfinite(ref).all():
                continue  # bf16 eager overflows in a few tiny random models; nothing to compare
            got = _logits(model, ids, "moe_fx")
            assert (got - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item()), (family, dtype, n)


def _experts_call(family: str, tokens: int, dtype=torch.float32):
    """A block's experts module and one call's inputs, captured from a real forward."""
    model = _switchable(family).to(dtype)
    set_implementation(model, "moe_fx")
    return first_experts_call(model, torch.randint(3, 100, (1, tokens)))


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "nemotron_h", "muse_spark", "aria", "deepseek_v3"])
def test_export_path_equals_grouped_path(family: str) -> None:
    """The distinct-experts path (what ONNX runs) computes what the grouped path computes."""
    for tokens in TOKENS:
        experts, (h, idx, w) = _experts_call(family, tokens)
        with torch.no_grad():
            grouped = moe_fx_experts_forward(experts, h, idx, w)
            distinct = distinct_forward.distinct_experts_forward(experts, h, idx, w)
        torch.testing.assert_close(distinct, grouped, rtol=1e-4, atol=1e-5)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_memory_is_not_tokens_times_expert_size() -> None:
    """No tensor grows as tokens x top-k x expert size (transformers' batched_mm does, as the check shows)."""
    experts, (h, idx, w) = _experts_call("qwen3_moe", 64)
    expert_size = experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()
    bound = idx.numel() * expert_size // 8
    for forward in (moe_fx_experts_forward, distinct_forward.distinct_experts_forward):
        with _LargestAllocation() as seen, torch.no_grad():
            forward(experts, h, idx, w)
        assert seen.largest < bound, (forward.__name__, seen.largest, bound)
    from transformers.integrations.moe import batched_mm_experts_forward

    with _LargestAllocation() as seen, torch.no_grad():
        batched_mm_experts_forward(experts, h, idx, w)
    assert seen.largest >= bound  # the check would catch a per-token weight copy


@pytest.mark.parametrize("family,dtype", [("qwen3_moe", torch.float32), ("gpt_oss", torch.bfloat16)])
def test_compiles_whole_graph(family: str, dtype: torch.dtype) -> None:
    """``torch.compile(fullgraph=True)`` (a graph break raises) on CPU, fp32 included, equal to eager."""
    model = _switchable(family).to(dtype)
    ids = torch.randint(3, 100, (2, 5))
    ref = _logits(model, ids, "eager")
    torch._dynamo.reset()
    compiled = moe_fx.compile(model)
    assert model.get_experts_implementation()[""] == "moe_fx"
    with torch.no_grad():
        got = compiled(input_ids=ids, use_cache=False).logits.float()
    tol = 1e-5 if dtype == torch.float32 else 0.1
    assert (got - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())


def test_gradients_equal_eager() -> None:
    """Gradient-based calibration (Fisher, HEAPr) backpropagates through the moe_fx experts."""
    model = _switchable("qwen3_moe")
    ids = torch.randint(3, 100, (2, 6))
    grads = {}
    for impl in ("eager", "moe_fx"):
        model.zero_grad()
        set_implementation(model, impl)
        model(input_ids=ids, use_cache=False).logits.float().square().mean().backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters() if "experts" in n}
    assert grads["eager"]
    for name, g in grads["eager"].items():
        torch.testing.assert_close(grads["moe_fx"][name], g, rtol=1e-4, atol=1e-6)


def test_registered_and_used_by_load(micro_path) -> None:
    """``import moe_fx`` registers the name; :func:`moe_fx.load` runs checkpoints with it."""
    model = moe_fx.load(micro_path)
    assert model.get_experts_implementation()[""] == "moe_fx"
    assert moe_fx.load(micro_path, experts_implementation=None).get_experts_implementation()[""] != "moe_fx"
    with pytest.raises(BadOptionError, match="unknown experts implementation"):
        set_implementation(model, "moe-fx")


def test_expert_parallel_modules_are_refused() -> None:
    experts, (h, idx, w) = _experts_call("qwen3_moe", 3)
    experts._is_expert_parallel = True
    with pytest.raises(BadOptionError, match="expert-parallel"):
        moe_fx_experts_forward(experts, h, idx, w)


def test_grouped_matmul_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel is picked where the graph is traced: the Triton ``triton_op`` for inference on the Triton
    kernel, the custom operator (with autograd) otherwise; both compute rows times their experts' weights."""
    from moe_fx.kernels import grouped_mm

    ids = torch.tensor([0, 0, 2, 3, 3, 3])
    offsets = torch.searchsorted(ids, torch.arange(4), right=True).to(torch.int32)
    x, w = torch.randn(6, 8), torch.randn(4, 12, 8)  # 16-byte strides, as grouped GEMM needs
    ref = torch.stack([w[e] @ x[i] for i, e in enumerate(ids)])
    calls = []  # the Triton op stands in here (no Triton on the CPU): it records the call and returns the reference
    monkeypatch.setattr(torch.ops.moe_fx, "triton_grouped_mm", lambda *a: calls.append("triton") or ref, raising=False)
    with torch.no_grad():
        assert torch.allclose(grouped_mm.grouped_matmul(x, w, offsets, False), ref, atol=1e-5) and calls == []
        monkeypatch.setenv("MOE_FX_GROUPED_MM", "triton")
        assert torch.allclose(grouped_mm.grouped_matmul(x, w, offsets, False), ref, atol=1e-5) and calls == ["triton"]
    monkeypatch.setenv("MOE_FX_GROUPED_MM", "native")
    x.requires_grad_(True)
    out = grouped_mm.grouped_matmul(x, w, offsets, False)
    out.sum().backward()
    assert calls == ["triton"] and torch.allclose(x.grad, torch.stack([w[e].sum(0) for e in ids]), atol=1e-5)


TRITON_CHECK = r"""
import torch
from moe_fx.kernels import triton_kernels as tk
tk.wrap_triton = lambda kernel: kernel  # the interpreter launches kernels itself
from moe_fx.kernels.triton_kernels import triton_grouped_mm, triton_routed_gemv
torch.manual_seed(0)
worst = 0.0
for rows, experts, k, n, transposed in [(8, 16, 64, 96, False), (40, 8, 48, 80, True), (200, 4, 32, 64, False), (0, 4, 32, 32, False)]:
    ids = torch.randint(0, experts, (rows,)).sort().values
    offsets = torch.searchsorted(ids, torch.arange(experts), right=True).to(torch.int32)
    x = torch.randn(rows, k)
    w = torch.randn(experts, k, n) if transposed else torch.randn(experts, n, k).transpose(-2, -1)
    ref = torch.stack([x[i] @ w[ids[i]] for i in range(rows)]) if rows else torch.empty(0, n)
    for tiles in (None, tk.Tiles(16, 32, 32, 4, 3, False, True)):  # the default shape; one program per 16-row block
        worst = max(worst, (triton_grouped_mm(x, w, offsets, tiles) - ref).abs().max().item() if rows else 0.0)
for tokens, top_k in [(1, 4), (3, 2)]:
    ids = torch.randint(0, 8, (tokens * top_k,))
    x, w = torch.randn(tokens, 300), torch.randn(8, 300, 40)
    ref = torch.stack([x[p // top_k] @ w[ids[p]] for p in range(tokens * top_k)])
    worst = max(worst, (triton_routed_gemv(x, w, ids, top_k) - ref).abs().max().item())
print(worst)
"""


@pytest.mark.skipif(interpreter_env() is None, reason=NO_INTERPRETER)
def test_triton_kernels_in_the_interpreter() -> None:
    """Both Triton kernels against a per-row reference, in fp32, run by Triton's CPU interpreter (the GPU
    check is ``benchmarks/experts_gpu_check.py``)."""
    out = subprocess.run([sys.executable, "-c", TRITON_CHECK], capture_output=True, text=True, timeout=600, env=interpreter_env())
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split()[-1]) < 1e-3
