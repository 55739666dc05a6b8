"""The int4 kernels as Triton compiles them for Hopper (no GPU needed: the PTX only): the 4-bit codes load in
vectors, and the grouped kernel's software pipeliner prefetches them.

A mask written in inputs (``k0 + 2 * halves < K``) once made Triton load the codes a byte per instruction and
synchronously: the int4 kernels then read 0.65-0.77 TB/s of packed bytes on an H200. Runs where Triton is
installed (CI has none)."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402

from moe_fx.kernels import triton_kernels as tk  # noqa: E402

POINTERS = {"x_ptr": "*bf16", "w_ptr": "*u8", "out_ptr": "*bf16", "offsets_ptr": "*i32", "ids_ptr": "*i64",
            "scale_ptr": "*fp32", "x_scale_ptr": "*fp32", "src_ptr": "*i64"}
UNALIGNED = {"stride_se", "stride_sn", "stride_sg", "ROWS_PER_X"}
"""Integer arguments not multiples of 16 at Qwen3-30B-A3B shapes (Triton specializes the others so)."""


def _ptx(kernel, constexprs: dict, num_stages: int = 3, pointers: dict | None = None) -> str:
    """``kernel`` compiled for sm_90 as a launch at Qwen3-30B-A3B's int4 shapes specializes it: unit strides as
    constants, pointers (``pointers`` overrides :data:`POINTERS`) and the other integers divisible by 16."""
    constexprs = {**constexprs, "stride_xk": 1, "stride_wk": 1}
    pointers = {**POINTERS, **(pointers or {})}
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = pointers.get(name, "i32")
        if name not in UNALIGNED:
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": num_stages}).asm["ptx"]


def test_int4_grouped_kernel_prefetches_its_codes_in_vectors() -> None:
    ptx = _ptx(tk._grouped_mm_kernel, {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "IEEE": False, "QUANT": 2,
                                       "FP8": False, "SWAP": False, "PTX": True, "TILED": False,
                                       "BLOCK_E": 128, "GATHER": True, "SUBS": 1})
    assert "ld.global.b8" not in ptx and "ld.global.u8" not in ptx
    assert "cp.async.cg.shared.global" in ptx  # the pipeliner's asynchronous copies


def test_int4_routed_gemv_loads_its_codes_in_vectors() -> None:
    ptx = _ptx(tk._routed_gemv_kernel, {"BLOCK_N": 16, "BLOCK_K": 128, "QUANT": 2, "PTX": True})
    assert "ld.global.b8" not in ptx and "ld.global.u8" not in ptx
    assert "ld.global.v2.b32" in ptx or "ld.global.v4.b32" in ptx


@pytest.mark.parametrize("subs", [1, 2])
def test_int4_codes_times_int8_rows_run_on_int8_tensor_cores(subs: int) -> None:
    """``QUANT`` 4: the codes become int8 in registers (one ``lop3`` a word) and multiply int8 rows on int8 tensor
    cores; the codes still load in vectors and are prefetched, also in steps of two tiles (decode's default):
    each step's copies and products then cover both tiles (twice one tile's)."""
    ptx = _int4_rows_ptx(subs)
    assert "mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32" in ptx
    assert "bf16.bf16" not in ptx  # no product in bf16: no code converted to it
    assert "ld.global.b8" not in ptx and "ld.global.u8" not in ptx
    assert "cp.async.cg.shared.global" in ptx
    if subs > 1:
        one = _int4_rows_ptx(1)
        for op in ("cp.async.cg.shared.global", "mma.sync.aligned.m16n8k32"):
            assert ptx.count(op) == subs * one.count(op), op


def _int4_rows_ptx(subs: int) -> str:
    return _ptx(tk._grouped_mm_kernel, {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "IEEE": False, "QUANT": 4,
                                        "FP8": False, "SWAP": False, "PTX": True, "TILED": False, "BLOCK_E": 128,
                                        "GATHER": True, "SUBS": subs}, pointers={"x_ptr": "*i8"})
