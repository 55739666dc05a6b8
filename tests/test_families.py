"""Every supported MoE family, on a tiny random model: discovery, fx check, expert dropping, save/reload.

The tiny models come from :mod:`tiny_models` (one config per family); what is checked is what a user
relies on: the spec matches the model, pruning nothing changes nothing, and a pruned model reloads with
stock ``from_pretrained`` and computes the same logits.
"""

from __future__ import annotations

import copy
import functools
import sys

import pytest
import torch
from tiny_models import SMALL, TINY_FAMILIES, UNSUPPORTED_FAMILIES, auto_class
from tiny_models import tiny_model as _build
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from moe_fx.errors import NotMoEError, UnsupportedFamilyError
from moe_fx.formats.checkpoint import save_checkpoint
from moe_fx.model.adapters import GENERIC
from moe_fx.model.fx_check import verify
from moe_fx.model.spec import MoEModelSpec
from moe_fx.model.trace import trace
from moe_fx.plan.plans import PrunePlan
from moe_fx.rewrite.drop_experts import drop_experts

E, K = SMALL["num_experts"], SMALL["num_experts_per_tok"]
INPUT = torch.randint(0, SMALL["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(0))


@functools.cache
def _pristine(family: str) -> nn.Module:
    return _build(family)


def tiny_model(family: str) -> nn.Module:
    """A private copy of the family's tiny model (built once per session: building dominates test time)."""
    return copy.deepcopy(_pristine(family))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT, use_cache=False).logits


def realigned(model: nn.Module) -> nn.Module:
    """Copy parameters into freshly allocated memory.

    safetensors loads tensors at 8-byte aligned offsets; CPU matmul kernels take another code path for
    unaligned data and change the last bits, which would hide real differences behind noise.
    """
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    return model


def experts_modules(model: nn.Module) -> int:
    """Routed-experts modules counted independently of moe-fx: ``*Experts`` classes with 3D weights."""
    return sum(
        type(m).__name__.endswith("Experts") and any(p.ndim == 3 for p in m.parameters(recurse=False))
        for m in model.modules()
    )


def kept_ids(spec: MoEModelSpec) -> list[int]:
    """Odd expert ids: half of the experts, the same number in every routing group."""
    return [i for i in range(spec.blocks[0].num_experts) if i % 2]


def plan_of(spec: MoEModelSpec, kept: list[int]) -> PrunePlan:
    return PrunePlan({b.path: list(kept) for b in spec.blocks})


def permuted_keep_all(spec: MoEModelSpec) -> list[int]:
    """All experts, reversed inside each routing group (plans list groups in order)."""
    b = spec.blocks[0]
    size = b.num_experts // (b.router.n_group or 1)
    return [g + size - 1 - i for g in range(0, b.num_experts, size) for i in range(size)]




@pytest.fixture(params=TINY_FAMILIES)
def family(request) -> str:
    return request.param


def test_trace_finds_every_block(family: str) -> None:
    model = tiny_model(family)
    spec = trace(model)
    assert len(spec.blocks) == experts_modules(model) > 0
    for block in spec.blocks:
        assert block.num_experts == E
        assert block.top_k == K
        assert model.get_parameter(block.router.weight).shape[0] == E
    assert spec.config_count_keys, "no config key holds the expert count"


def test_fx_check_agrees_with_spec(family: str) -> None:
    model = tiny_model(family)
    checks = verify(model, trace(model))
    assert checks
    for check in checks:
        assert check.ok, (check.block, check.mismatches, check.error)
        assert check.graph.top_k == K and check.graph.num_experts in (None, E)


def test_graph_inference_matches_adapter(family: str, monkeypatch) -> None:
    """Without its adapter, discovery reads the same routing rule from the block's graph."""
    model = tiny_model(family)
    declared = trace(model)
    # ``moe_fx.model.trace`` the attribute is the function; patch the module it comes from
    monkeypatch.setattr(sys.modules[trace.__module__], "get_adapter", lambda model_type: GENERIC)
    inferred = trace(model)
    assert inferred.family == "generic"
    for a, b in zip(declared.blocks, inferred.blocks, strict=True):
        assert (a.router.score_fn, a.router.top_k, a.router.norm_topk_prob) == (
            b.router.score_fn, b.router.top_k, b.router.norm_topk_prob,
        ), a.path


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_keep_all_is_identity(family: str) -> None:
    model = tiny_model(family)
    before = logits(model)
    spec = trace(model)
    drop_experts(model, spec, PrunePlan.keep_all(spec))
    assert torch.equal(logits(model), before)
    drop_experts(model, spec, plan_of(spec, permuted_keep_all(spec)))
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_drop_experts_saves_and_reloads(family: str, tmp_path) -> None:
    model = tiny_model(family)
    spec = trace(model)
    kept = kept_ids(spec)
    new_spec = drop_experts(model, spec, plan_of(spec, kept))
    assert all(b.num_experts == len(kept) for b in new_spec.blocks)
    for ref in spec.config_count_keys:
        path, _, key = ref.rpartition(":")
        config = model.config
        for part in filter(None, path.split(".")):
            config = getattr(config, part)
        assert getattr(config, key) == len(kept), ref
    after = logits(model)
    assert torch.isfinite(after).all()
    out = save_checkpoint(model, tmp_path / "pruned")
    reloaded = realigned(auto_class(model.config).from_pretrained(out).eval())
    assert trace(reloaded).blocks[0].num_experts == len(kept)
    assert torch.equal(logits(reloaded), after)


def _routed_call(model: nn.Module, spec: MoEModelSpec, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first block's output on ``x`` and the expert ids it routed each token to."""
    block = spec.blocks[0]
    seen = {}
    hook = model.get_submodule(block.experts.path).register_forward_pre_hook(lambda m, args: seen.update(idx=args[1]))
    try:
        with torch.no_grad():
            out = model.get_submodule(block.path)(x)
    finally:
        hook.remove()
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(-1, x.shape[-1]), seen["idx"].reshape(x.shape[1], -1)  # some blocks return flattened outputs


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tokens_on_kept_experts_are_unchanged(family: str) -> None:
    """With renormalised top-k weights, a token whose experts all survive gets the same block output."""
    model = tiny_model(family)
    spec = trace(model)
    router = spec.blocks[0].router
    if not (router.norm_topk_prob or router.score_fn == "softmax_after_topk"):
        pytest.skip("top-k weights are not renormalised: dropping experts changes every token's weights")
    hidden = model.get_parameter(router.weight).shape[1]  # the block's input (MuseSpark's experts run wider)
    x = torch.randn(1, 64, hidden, generator=torch.Generator().manual_seed(1))
    before, routed = _routed_call(model, spec, x)
    kept = kept_ids(spec)
    drop_experts(model, spec, plan_of(spec, kept))
    after, routed_after = _routed_call(model, trace(model), x)
    on_kept = torch.isin(routed, torch.tensor(kept)).all(dim=1)
    assert on_kept.sum() >= 2, "too few tokens routed only to kept experts"
    old_ids = torch.tensor(kept)[routed_after]
    same = (old_ids.sort(dim=1).values == routed.sort(dim=1).values).all(dim=1)
    # group limits and a selection bias added to softmax probabilities (Ernie) may legitimately re-rank kept experts
    if (router.n_group or 1) == 1 and not (router.selection_bias and router.score_fn == "softmax"):
        assert same[on_kept].all(), "routing among kept experts changed"
    tokens = on_kept & same
    assert tokens.any()
    torch.testing.assert_close(after[tokens], before[tokens], atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", sorted(UNSUPPORTED_FAMILIES))
def test_unsupported_family_raises(family: str) -> None:
    with pytest.raises(UnsupportedFamilyError, match="not supported"):
        trace(tiny_model(family))


def test_dense_model_is_not_moe() -> None:
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4)
    with pytest.raises(NotMoEError, match="Mixture-of-Experts"):
        trace(LlamaForCausalLM(config))


def test_llama4_expert_layout_is_read_from_shapes() -> None:
    """Llama 4 has no ``is_transposed`` attribute but stores ``[E, H, 2I]`` / ``[E, I, H]``: read it from the shapes."""
    from tiny_models import tiny_config

    config = tiny_config("llama4")
    config.text_config.intermediate_size = 32  # differs from hidden (64), so the layout is observable
    model = auto_class(config).from_config(config)
    experts = trace(model).blocks[0].experts
    assert experts.is_transposed and experts.intermediate_size == 32
    assert model.get_parameter(experts.down).shape[1:] == (32, 64)


def test_count_on_the_blocks_container_is_updated() -> None:
    """Ernie-VL's ``mlp`` reshapes its blocks' router logits by its own ``num_experts``: dropping experts updates it
    too (the 12-token INPUT hid it: 12 x 6 routes divide by 8, 9 x 6 do not)."""
    model = tiny_model("ernie4_5_vl_moe")
    spec = trace(model)
    drop_experts(model, spec, PrunePlan({b.path: list(range(6)) for b in spec.blocks}))
    with torch.no_grad():
        model(input_ids=INPUT[:, :9], use_cache=False)
    assert {model.get_submodule(b.path.rsplit(".", 1)[0]).num_experts for b in spec.blocks} == {6}
