"""The quantized Triton kernels' arithmetic without a GPU: both kernels run in Triton's interpreter
(``TRITON_INTERPRET=1``, in a subprocess: it must be set before Triton is imported) against the dequantized
weights, every scheme, an input size that is not a multiple of the tile; the router top-k kernel (also with
its softmax and renormalization) against torch; ``benchmarks/int8_rows_quality.py``'s emulated int8 rows against ``quantize_rows``. Skipped where Triton is not installed
(CPU builds of torch) unless ``scripts/test.sh`` installed it beside the venv (``MOE_FX_TRITON_PATH``)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import NO_INTERPRETER, interpreter_env

pytestmark = pytest.mark.skipif(interpreter_env() is None, reason=NO_INTERPRETER)

SCRIPT = r"""
import pathlib
import sys

import torch
from moe_fx.kernels import triton_kernels as tk
from moe_fx.kernels.quantized import SCHEMES, dequantize, quantize

tk.wrap_triton = lambda kernel: kernel  # the interpreter launches kernels itself
torch.manual_seed(0)
TILED = tk.Tiles(2, 64, 128, 4, 3, False, True)  # 2-row blocks: experts of 2, 3 and 4 rows span 1-2 blocks
TILED_SWAP = tk.Tiles(4, 64, 128, 4, 3, True, True)
SUBS = (tk.Tiles(16, 64, 128, 4, 4, False, False, 2), tk.Tiles(2, 64, 128, 4, 3, True, True, 2))  # 4-bit: 2 tiles a step
for k in (328,):  # 2.56 tiles of 128: full, partial and (4-bit, 2 tiles a step) a second step
    w = torch.randn(6, 96, k) * 0.02
    x = torch.randn(5, k)
    ids = torch.tensor([0, 3, 5, 3, 1, 2, 4, 0, 1, 5])
    tokens = torch.randn(7, k)
    src = torch.tensor([3, 0, 6, 1, 1, 2, 5, 4, 0, 6, 2, 3])  # sorted row r is tokens[src[r]]
    rows = tokens[src]
    owner = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3, 3, 5, 5])
    offsets = torch.searchsorted(owner, torch.arange(6), right=True).to(torch.int32)
    for scheme, spec in SCHEMES.items():
        codes, scale = quantize(w, scheme)
        dense = dequantize(codes, scale, scheme)
        quant = (scale, spec.group_size(k), spec.kernel)
        got = tk.triton_routed_gemv(x, codes.transpose(-2, -1), ids, 2, quant)
        want = torch.stack([x[p // 2] @ dense[ids[p]].T for p in range(len(ids))])
        assert (got - want).abs().max() < 1e-5, (scheme, k, "gemv")
        want = torch.stack([rows[i] @ dense[owner[i]].T for i in range(len(owner))])
        four_bit = SUBS if spec.kernel == 2 else ()
        for tiles in ((16, 64, 128, 4, 4, False), (64, 128, 64, 8, 3, False), (16, 64, 128, 4, 4, True), TILED, TILED_SWAP, *four_bit):
            got = tk.triton_grouped_mm(rows, codes.transpose(-2, -1), offsets, tiles, quant)
            assert (got - want).abs().max() < 1e-5, (scheme, k, tiles)
            got = tk.triton_grouped_mm(tokens, codes.transpose(-2, -1), offsets, tiles, quant, src=src)
            assert (got - want).abs().max() < 1e-5, (scheme, k, tiles, "rows read in place")
        if spec.kernel in (1, 2):  # 8-bit activations: exact against the dequantized activations' product
            x_codes, x_scale = tk.quantize_rows(rows, spec.fp8)
            assert x_codes.dtype == (codes.dtype if spec.kernel == 1 else torch.int8), x_codes.dtype
            assert x_scale.shape == (12, -(-k // 128)), x_scale.shape
            x_deq = x_codes.float() * x_scale.repeat_interleave(128, -1)[:, :k]
            rel = (x_deq - rows).norm() / rows.norm()
            assert rel < (0.08 if spec.fp8 else 0.01), (scheme, float(rel))  # e4m3 keeps 3 mantissa bits
            want8 = torch.stack([x_deq[i] @ dense[owner[i]].T for i in range(len(owner))])
            t_codes, t_scale = tk.quantize_rows(tokens, spec.fp8)
            for tiles in ((16, 64, 128, 4, 4, False), (64, 128, 128, 8, 3, False), (16, 64, 128, 4, 3, True), TILED, TILED_SWAP, *four_bit):
                got = tk.triton_grouped_mm(x_codes, codes.transpose(-2, -1), offsets, tiles, quant, x_scale, torch.float32)
                assert (got - want8).abs().max() < 1e-5, (scheme, k, tiles, "8-bit activations")
                got = tk.triton_grouped_mm(t_codes, codes.transpose(-2, -1), offsets, tiles, quant, t_scale, torch.float32, src)
                assert (got - want8).abs().max() < 1e-5, (scheme, k, tiles, "8-bit activations read in place")
try:  # several tiles a step are for 4-bit codes only
    tk.triton_grouped_mm(rows, codes.transpose(-2, -1), offsets, SUBS[0], (scale, 128, 1))
except ValueError as exc:
    assert "4-bit codes" in str(exc), exc
else:
    raise AssertionError("8-bit codes ran in steps of 2 tiles")
# benchmarks/int8_rows_quality.py emulates the int8 rows on a CPU: the same codes and scales as quantize_rows
sys.path.insert(0, str(pathlib.Path(tk.__file__).parents[2] / "benchmarks"))
from int8_rows_quality import int8_rows
for k in (384, 200):
    x = torch.randn(9, k) * torch.rand(9, 1) * 4
    x_codes, x_scale = tk.quantize_rows(x, False)
    assert torch.equal(int8_rows(x), x_codes.float() * x_scale.repeat_interleave(128, -1)[:, :k]), k
for width, k in ((128, 8), (100, 6), (7, 7), (300, 22)):  # moe_fx::topk_rows against torch.topk
    z = torch.randn(5, width)
    z[0, 3] = z[0, 4] = 10.0  # a tie for the largest: the lower index first
    z[2, 5] = float("nan")  # NaN ranks first, as in torch
    values, indices = tk.triton_topk_rows(z, k)
    want = torch.topk(z, k)
    assert torch.equal(values.nan_to_num(9.0), want.values.nan_to_num(9.0)), (width, k)
    assert torch.equal(indices, want.indices) or torch.equal(z.gather(1, indices).nan_to_num(9.0), want.values.nan_to_num(9.0)), (width, k)
    assert indices[0, :2].tolist() == [3, 4], indices[0]
    for normalize in (False, True):  # moe_fx::softmax_topk_rows: the softmax (and renormalization) in the program
        values, indices = tk.triton_topk_rows(z.bfloat16(), k, True, normalize, torch.float32)
        want = torch.topk(torch.softmax(z.bfloat16(), -1, dtype=torch.float32), k)
        want_values = want.values / want.values.sum(-1, keepdim=True) if normalize else want.values
        assert values.dtype == torch.float32 and values[2].isnan().all(), (width, k)  # a NaN logit: a NaN row, as torch
        torch.testing.assert_close(values[[0, 1, 3, 4]], want_values[[0, 1, 3, 4]], rtol=1e-6, atol=1e-7)
        picked = torch.softmax(z.bfloat16(), -1, dtype=torch.float32).gather(1, indices)  # ties (bf16) in either order
        assert torch.equal(picked[[0, 1, 3, 4]], want.values[[0, 1, 3, 4]]), (width, k, normalize)
print("ok")
"""


def test_quantized_kernels_in_interpreter() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=interpreter_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
