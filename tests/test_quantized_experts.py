"""Routed experts quantized in memory (fp8-block, int8-channel, int4-group) and run by the moe_fx experts
implementation: the codes' format, every family against the dequantized reference (per-layer counts and widths
included), compile, composition after a prune, loading an FP8 checkpoint into FP8 experts, refusals, and on
CUDA the Triton kernels against the dequantized weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_channels import _random_plan
from test_families import kept_ids, tiny_model
from test_fp8_block import _state
from tiny_models import TINY_FAMILIES

from moe_fx import PrunePlan, compose
from moe_fx.errors import BadOptionError
from moe_fx.formats import save_checkpoint
from moe_fx.formats.fp8_block import SCALE_SUFFIX as STORED_SCALE
from moe_fx.formats.loading import load_model
from moe_fx.formats.quantized_checkpoint import quantize_checkpoint
from moe_fx.kernels import experts_module as layout
from moe_fx.kernels.implementation import set_implementation
from moe_fx.kernels.quantized import FP8_MAX, SCHEMES, QuantizedWeight, dequantize, quantize, relative_error
from moe_fx.model.trace import trace
from moe_fx.passes import DropExperts, PruneChannels
from moe_fx.rewrite.quantize_experts import QuantizeExperts, quantize_experts_

FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3", "qwen2_moe", "olmoe", "gpt_oss"]
"""Softmax / sigmoid group-limited routing, shared experts, and GPT-OSS's transposed, interleaved experts with biases."""


def _ids(model, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(3, model.config.get_text_config().vocab_size - 3, shape, generator=torch.Generator().manual_seed(0))


def _dequantized_copy(model: torch.nn.Module, quantized: torch.nn.Module) -> torch.nn.Module:
    """``model`` with each experts weight replaced by what ``quantized``'s codes and scales stand for."""
    ref = copy.deepcopy(model)
    for block in trace(ref).blocks:
        q = quantized.get_submodule(block.experts.path)
        dense = ref.get_submodule(block.experts.path)
        for name, (weight, _) in ((layout.up_projection_name(q), layout.up_projection(q)), ("down_proj", layout.down_projection(q))):
            getattr(dense, name).data.copy_(weight.gather(torch.arange(weight.shape[0]), getattr(dense, name).dtype))
    return ref


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_codes_round_trip(scheme: str) -> None:
    """Every weight within half a step of its code (integers), or within FP8's 3-bit mantissa; int4 codes
    hold two inputs a byte, even input in the low nibble."""
    w = torch.randn(3, 40, 260) * torch.logspace(-3, 0, 260)  # columns of very different magnitudes
    codes, scale = quantize(w, scheme)
    spec = SCHEMES[scheme]
    group = spec.group_size(260)
    assert scale.shape == (3, 40, -(-260 // group)) and scale.dtype == torch.float32
    back = dequantize(codes, scale, scheme)
    step = scale.repeat_interleave(group, -1)[..., :260]
    if spec.fp8:
        assert codes.dtype == torch.float8_e4m3fn and codes.float().abs().max() <= FP8_MAX
        assert torch.all((back - w).abs() <= torch.maximum(w.abs() / 16, step * 2**-6) + 1e-12)
    elif spec.kernel == 1:
        assert torch.all((back - w).abs() <= step / 2 + 1e-7)
    else:
        # int4 clips where that pays: weights inside the code range within half a step, and no group's squared
        # error above that of the unclipped scale max|w| / 7
        inside = w.abs() <= step * spec.qmax
        assert torch.all(((back - w).abs() <= step / 2 + 1e-7) | ~inside)
        groups = torch.nn.functional.pad(w, (0, -260 % group)).unflatten(-1, (-1, group))
        plain = groups.abs().amax(-1, keepdim=True) / spec.qmax
        plain_error = ((torch.round(groups / plain).clamp(-8, 7) * plain - groups) ** 2).sum(-1)
        error = ((torch.nn.functional.pad(back - w, (0, -260 % group))).unflatten(-1, (-1, group)) ** 2).sum(-1)
        assert torch.all(error <= plain_error * (1 + 1e-5)) and error.sum() < plain_error.sum()
        assert codes.shape == (3, 40, 130) and codes.dtype == torch.uint8
        # max |w| = 8: scale 1 (7/8 of 8/7) holds -8 and 7 exactly, where 8/7 would round 7 to 6; stored +8 as
        # 0 (low nibble, the even input) and 15 (high)
        codes, scale = quantize(torch.tensor([[-8.0, 7.0] + [0.0] * 126]), scheme)
        assert codes[0, 0].item() == 0 | 15 << 4 and scale.item() == 1.0


def test_fp8_block_halves_match_the_checkpoint_format() -> None:
    """A fused gate/up projection gets the blocks a per-expert checkpoint stores for each half (the width is
    not a multiple of 128, so blocks spanning both halves would differ)."""
    from moe_fx.formats.fp8_block import quantize as checkpoint_quantize

    gate, up = torch.randn(200, 300), torch.randn(200, 300) * 5
    codes, scale = quantize(torch.cat([gate, up]), "fp8-block", segments=(200, 200))
    for half, rows in ((gate, slice(0, 200)), (up, slice(200, 400))):
        ref_codes, ref_scale = checkpoint_quantize(half)
        assert torch.equal(codes[rows].view(torch.uint8), ref_codes.view(torch.uint8))
        assert torch.equal(scale[rows], ref_scale.repeat_interleave(128, 0)[:200])


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_matches_dequantized_reference(family: str) -> None:
    """Per-layer expert counts (first block pruned) and zero-padded per-expert widths, then each scheme: the
    quantized model's logits equal the dense model's with the dequantized weights, prefill and a decode step."""
    model = tiny_model(family).float().eval()
    spec = trace(model)
    DropExperts(plan=PrunePlan({spec.blocks[0].path: kept_ids(spec)}))(model)
    PruneChannels(plan=_random_plan(trace(model), 0.5, seed=1, vary=True))(model)
    set_implementation(model, "moe_fx")
    ids = _ids(model)
    for scheme in SCHEMES:
        quantized = copy.deepcopy(model)
        record = quantize_experts_(quantized, scheme)
        assert record["experts_bytes"] < record["experts_bytes_before"] / (3.5 if scheme != "int4-group" else 6)
        experts = quantized.get_submodule(trace(quantized).blocks[0].experts.path)
        assert isinstance(layout.up_projection(experts)[0], QuantizedWeight) and not experts.down_proj.requires_grad
        reference = _dequantized_copy(model, quantized)
        with torch.no_grad():
            got, want = quantized(ids).logits, reference(ids).logits
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def test_compiled_matches_eager_and_source_untouched() -> None:
    model = tiny_model("qwen3_moe").float().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = copy.deepcopy(model)
    quantize_experts_(quantized, "int4-group")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    ids = _ids(model)
    with torch.no_grad():
        eager = quantized(ids).logits
        compiled = torch.compile(quantized, fullgraph=True)(ids).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_pass_composes_after_a_prune() -> None:
    model = tiny_model("mixtral").float().eval()
    spec = trace(model)
    plan = PrunePlan({b.path: list(range(b.num_experts // 2)) for b in spec.blocks})
    compose(DropExperts(plan=plan), QuantizeExperts("fp8-block"))(model)
    experts = model.get_submodule(spec.blocks[0].experts.path)
    assert layout.quantization(experts) == "fp8-block" and experts.gate_up_proj.shape[0] == spec.blocks[0].num_experts // 2
    with torch.no_grad():
        assert torch.isfinite(model(_ids(model)).logits).all()


def test_refusals() -> None:
    model = tiny_model("qwen3_moe").float()
    with pytest.raises(BadOptionError, match="unknown quantization scheme 'int3'"):
        quantize_experts_(model, "int3")
    quantize_experts_(model, "int8-channel")
    with pytest.raises(BadOptionError, match="already quantized"):
        quantize_experts_(model, "fp8-block")
    with pytest.raises(ValueError, match="even input size"):
        quantize(torch.randn(2, 4, 7), "int4-group")
    with pytest.raises(BadOptionError, match="unknown quantization scheme"):
        compose(QuantizeExperts("fp4"))(tiny_model("qwen3_moe").float())


def test_fp8_checkpoint_loads_into_fp8_experts(tmp_path) -> None:
    """``load_model(quantize="fp8-block")`` of an fp8-block checkpoint gives back the stored codes and scales
    bit for bit (bfloat16 source), and its logits are those of transformers' own dequantized load."""
    model = tiny_model("qwen3_moe").to(torch.bfloat16)
    src = save_checkpoint(model, tmp_path / "src", report=False)
    quantize_checkpoint(src, tmp_path / "fp8")
    stored = _state(tmp_path / "fp8")
    loaded = load_model(tmp_path / "fp8", quantize="fp8-block")
    dense = load_model(tmp_path / "fp8", quantize=None)
    assert load_model(tmp_path / "fp8").get_submodule(trace(dense).blocks[0].experts.path).down_proj.dtype == torch.bfloat16  # auto: dense on CPU
    block = trace(loaded).blocks[0]
    experts = loaded.get_submodule(block.experts.path)
    for e in range(block.num_experts):
        key = f"{block.experts.path}.{e}.down_proj.weight"
        assert torch.equal(experts.down_proj[e].view(torch.uint8), stored[key].view(torch.uint8))
        assert torch.equal(experts.down_proj_scale[e], stored[key + STORED_SCALE].repeat_interleave(128, 0)[: stored[key].shape[0]])
        gate, up = (stored[f"{block.experts.path}.{e}.{p}_proj.weight"] for p in ("gate", "up"))
        assert torch.equal(experts.gate_up_proj[e].view(torch.uint8), torch.cat([gate, up]).view(torch.uint8))
    ids = _ids(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits.float(), dense(ids).logits.float(), rtol=0, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels run on CUDA")
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_cuda_kernels_match_dequantized(scheme: str) -> None:
    """Qwen3-30B-A3B expert shapes against the dequantized weights, in bfloat16: the decode path (routed GEMV)
    and the sorted path (grouped kernel)."""
    from moe_fx.kernels import quantized_ops, triton_kernels

    torch.manual_seed(0)
    experts, hidden, width = 16, 2048, 768
    for out_f, in_f in ((2 * width, hidden), (hidden, width)):
        w = torch.randn(experts, out_f, in_f, device="cuda") * 0.02
        codes, scale = quantize(w, scheme)
        weight = QuantizedWeight(codes, scale, scheme, False)
        dense = dequantize(codes, scale, scheme, torch.float32)
        x = torch.randn(4, in_f, device="cuda", dtype=torch.bfloat16)
        ids = torch.tensor([1, 5, 9, 15, 0, 3, 5, 7], device="cuda")
        with torch.no_grad():
            got = quantized_ops.routed(x, weight, ids, 2).float()
            want = torch.stack([x[p // 2].float() @ dense[ids[p]].T for p in range(8)])
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
            rows = torch.randn(600, in_f, device="cuda", dtype=torch.bfloat16)
            owner = torch.sort(torch.randint(0, experts, (600,), device="cuda")).values
            offsets = torch.searchsorted(owner, torch.arange(experts, device="cuda"), right=True).to(torch.int32)
            got = quantized_ops.grouped(rows, weight, offsets).float()
            want = torch.einsum("ri,roi->ro", rows.float(), dense[owner])
            if quantized_ops.activations_8bit(rows.device, scheme):
                # the activations' own rounding first (at most 8% of the rows' norm for e4m3, 1% for int8) ...
                assert relative_error(want, got) < (0.08 if SCHEMES[scheme].fp8 else 0.01)
                # ... and then exact against the dequantized activations' product
                x_codes, x_scale = triton_kernels.quantize_rows(rows, SCHEMES[scheme].fp8)
                rows = (x_codes.float() * x_scale.repeat_interleave(128, -1)[:, :in_f])
                want = torch.einsum("ri,roi->ro", rows, dense[owner])
            torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-2 * want.abs().max().item())


def test_cli_eval_quantizes_all_but_the_reference(micro_path, valid_path, tmp_path, capsys) -> None:
    """``moe-fx eval A A --quantize int4-group``: the first model is the unquantized reference, the second its
    int4 experts (what quantizing alone costs); a bad scheme is refused by the parser."""
    from moe_fx.cli import main

    out = tmp_path / "eval.json"
    args = ["eval", str(micro_path), str(micro_path), "--quantize", "int4-group", "--data", str(valid_path), "--eval-seqs", "1",
            "--eval-seq-len", "128", "--quiet", "--json", str(out)]
    assert main(args) == 0
    assert "+ int4-group" in capsys.readouterr().out
    results = json.loads(out.read_text())
    reference, quantized = results[str(micro_path)], results[f"{micro_path} + int4-group"]
    assert quantized["nll"]["mean"]["nll"] != reference["nll"]["mean"]["nll"]
    with pytest.raises(SystemExit):
        main(["eval", str(micro_path), "--quantize", "int3", "--data", str(valid_path)])


def test_onnx_export_refuses_quantized_experts(tmp_path) -> None:
    pytest.importorskip("onnxscript")
    from moe_fx.deliver.onnx import export as onnx_export

    model = tiny_model("qwen3_moe").float()
    quantize_experts_(model, "int8-channel")
    with pytest.raises(BadOptionError, match="quantized in memory"):
        onnx_export.export_onnx(model, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


NOT_FUSED = {"llama4", "step3p7"}
"""Families whose experts are not transformers' fused-experts modules: refused."""


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_tiny_family(family: str) -> None:
    """Each tiny family with one scheme (rotating over the three): equal to its dequantized reference, or refused
    with the reason when its experts are not fused."""
    model = tiny_model(family).float().eval()
    scheme = list(SCHEMES)[TINY_FAMILIES.index(family) % len(SCHEMES)]
    quantized = copy.deepcopy(model)
    if family in NOT_FUSED:
        with pytest.raises(BadOptionError, match="not a transformers fused-experts module"):
            quantize_experts_(quantized, scheme)
        return
    quantize_experts_(quantized, scheme)
    set_implementation(model, "moe_fx")
    reference = _dequantized_copy(model, quantized)
    ids = _ids(model, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(quantized(ids, use_cache=False).logits, reference(ids, use_cache=False).logits, rtol=0, atol=2e-5)


def test_eight_bit_activations_only_where_they_run(monkeypatch) -> None:
    """The grouped kernel quantizes activations to 8 bits on CUDA with 8-bit tensor cores, for every scheme (int4
    codes run on int8 ones); the CPU reference path never quantizes them, and
    ``MOE_FX_QUANTIZED_ACTIVATIONS=weight-only`` turns it off."""
    from moe_fx.kernels import quantized_ops

    cpu = torch.device("cpu")
    assert not any(quantized_ops.activations_8bit(cpu, s) for s in SCHEMES)
    monkeypatch.setattr(quantized_ops, "_has_8bit_tensor_cores", lambda device, fp8: True)
    cuda = torch.device("cuda")
    assert [s for s in SCHEMES if quantized_ops.activations_8bit(cuda, s)] == ["fp8-block", "int8-channel", "int4-group"]
    monkeypatch.setenv("MOE_FX_QUANTIZED_ACTIVATIONS", "weight-only")
    assert not any(quantized_ops.activations_8bit(cuda, s) for s in SCHEMES)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels run on CUDA")
@pytest.mark.parametrize("scheme", [None, *SCHEMES])
def test_cuda_grouped_orientations_agree(scheme: str | None) -> None:
    """The grouped kernel's two orientations (``SWAP``: the weights' tile as the left operand) and both tile
    families give the dense (``None``) or dequantized product, weight-only and with 8-bit activations."""
    from moe_fx.kernels import triton_kernels

    torch.manual_seed(0)
    experts, out_f, in_f = 8, 384, 640
    w = torch.randn(experts, out_f, in_f, device="cuda") * 0.02
    rows = torch.randn(200, in_f, device="cuda", dtype=torch.bfloat16)
    owner = torch.sort(torch.randint(0, experts, (200,), device="cuda")).values
    offsets = torch.searchsorted(owner, torch.arange(experts, device="cuda"), right=True).to(torch.int32)
    if scheme is None:
        codes, quant, dense = w.bfloat16(), None, w.bfloat16().float()
    else:
        codes, scale = quantize(w, scheme)
        quant, dense = (scale, SCHEMES[scheme].group_size(in_f), SCHEMES[scheme].kernel), dequantize(codes, scale, scheme, torch.float32)
    want = torch.einsum("ri,roi->ro", rows.float(), dense[owner])
    eight_bit = scheme is not None  # every scheme also runs with 8-bit activations (int4 on int8 tensor cores)
    x_codes, x_scale = triton_kernels.quantize_rows(rows, SCHEMES[scheme].fp8) if eight_bit else (None, None)
    for tiles in ((16, 64, 128, 4, 3), (64, 128, 128, 4, 3), (16, 128, 128, 8, 3)):
        for swap in (False, True):
            got = triton_kernels.triton_grouped_mm(rows, codes.transpose(-2, -1), offsets, (*tiles, swap), quant).float()
            torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-2 * want.abs().max().item())
            if eight_bit:
                got8 = triton_kernels.triton_grouped_mm(x_codes, codes.transpose(-2, -1), offsets, (*tiles, swap), quant, x_scale, torch.bfloat16)
                assert relative_error(want, got8.float()) < (0.08 if SCHEMES[scheme].fp8 else 0.01), (tiles, swap)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels run on CUDA")
def test_cuda_nibbles_exact() -> None:
    """The inline-PTX nibble conversions give every byte's two codes exactly, in the order the plain forms do:
    to float (two codes an instruction) and to the int8 ``16 (c - 8)`` of int8 tensor cores."""
    import triton
    import triton.language as tl

    from moe_fx.kernels.triton_kernels import _nibble_codes, _nibbles

    @triton.jit
    def convert(byte_ptr, low_ptr, high_ptr, low8_ptr, high8_ptr, PTX: tl.constexpr):
        i = tl.arange(0, 1024)
        byte = tl.load(byte_ptr + i)
        low, high = _nibbles(byte, tl.float32, PTX)
        tl.store(low_ptr + i, low)
        tl.store(high_ptr + i, high)
        tl.store(low8_ptr + i, _nibble_codes(byte, False, PTX))
        tl.store(high8_ptr + i, _nibble_codes(byte, True, PTX))

    byte = torch.arange(1024, device="cuda").remainder(256).to(torch.uint8)
    want = ((byte & 0xF).float() - 8, (byte >> 4).float() - 8)
    for ptx in (False, True):
        low, high = torch.empty(1024, device="cuda"), torch.empty(1024, device="cuda")
        low8, high8 = (torch.empty(1024, device="cuda", dtype=torch.int8) for _ in range(2))
        convert[(1,)](byte, low, high, low8, high8, PTX=ptx)
        assert torch.equal(low, want[0]) and torch.equal(high, want[1]), ptx
        assert torch.equal(low8.float(), 16 * want[0]) and torch.equal(high8.float(), 16 * want[1]), ptx


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_decode_bound_follows_the_grouped_kernel(scheme: str, monkeypatch) -> None:
    """The routed GEMV keeps up to one pair per expert only for 8-bit codes the grouped kernel converts in every
    tile (weight-only); int4's grouped kernel, whose codes load in vectors, takes over from a quarter."""
    from moe_fx.kernels import quantized_ops, routed_gemv

    codes, scale = quantize(torch.randn(4, 8, 256), scheme)
    weight = QuantizedWeight(codes, scale, scheme, False)
    monkeypatch.setattr(quantized_ops, "activations_8bit", lambda device, scheme: False)  # no 8-bit tensor cores
    assert quantized_ops.converts_8bit_codes(weight) is (scheme != "int4-group")
    monkeypatch.setattr(quantized_ops, "activations_8bit", lambda device, scheme: True)
    assert not quantized_ops.converts_8bit_codes(weight)
    monkeypatch.setattr(routed_gemv.grouped_mm, "triton_here", lambda device: True)
    with torch.no_grad():  # the routed GEMV has no backward
        for weight_only, bound in ((False, routed_gemv.MAX_PAIRS_PER_EXPERT), (True, routed_gemv.WEIGHT_ONLY_MAX_PAIRS_PER_EXPERT)):
            assert routed_gemv.applies(int(128 * bound), 128, weight.device, weight_only)
            assert not routed_gemv.applies(int(128 * bound) + 1, 128, weight.device, weight_only)
