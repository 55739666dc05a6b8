"""Distill: recovery fine-tuning of a pruned model towards the unpruned one's logits."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_qwen3
from tiny_models import tiny_model
from torch.nn.utils import parametrize

from moe_fx import compose, state_of
from moe_fx.errors import BadOptionError
from moe_fx.formats.loading import load_model
from moe_fx.model.trace import trace
from moe_fx.passes import Calibrate, Distill, DropExperts, PruneChannels, Score
from moe_fx.plan.plans import ChannelPlan
from moe_fx.rewrite.adapters import adapter_parameter_count, low_rank_adapters
from moe_fx.rewrite.distill import kl_to_teacher

WINDOWS = torch.randint(2, 128, (8, 24), generator=torch.Generator().manual_seed(5))


def _pruned(model, ratio: float = 0.5, windows: torch.Tensor = WINDOWS):
    return compose(Calibrate(windows, batch_size=4, show_progress=False), Score("reap"), DropExperts(ratio=ratio))(model)


def _kl(student, teacher, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return kl_to_teacher(student(input_ids=ids).logits, teacher(input_ids=ids).logits).item()


def _distill(model, teacher, **kw):
    return Distill(teacher=teacher, data=WINDOWS, show_progress=False, **{"batch_size": 4, "steps": 12, "lr": 1e-3, **kw})(model)


def test_kl_matches_its_definition() -> None:
    s, t = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    p = t.softmax(-1)
    brute = (p * (p.log() - s.log_softmax(-1))).sum(-1).mean()
    assert torch.allclose(kl_to_teacher(s, t), brute, atol=1e-6) and kl_to_teacher(t, t).item() == pytest.approx(0, abs=1e-6)


def test_zero_steps_changes_nothing() -> None:
    teacher = tiny_qwen3()
    model = _pruned(tiny_qwen3())
    ref = model(input_ids=WINDOWS).logits
    out = _distill(model, teacher, steps=0)
    assert torch.equal(out(input_ids=WINDOWS).logits, ref) and not state_of(out).history[-1].modified


def test_distillation_moves_the_pruned_model_towards_the_teacher_and_only_what_it_trains(micro_path) -> None:
    """On the trained micro model with half its experts dropped: KL to the unpruned model on the calibration
    windows falls; with ``train="experts"`` attention, norms and embeddings are untouched."""
    teacher = load_model(micro_path, dtype="float32")
    ids = torch.randint(2, teacher.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    model = _pruned(copy.deepcopy(teacher), windows=ids)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".mlp." not in n}
    before = _kl(model, teacher, ids)
    out = Distill(teacher=teacher, data=ids, steps=15, lr=1e-3, batch_size=4, show_progress=False)(model)
    assert _kl(out, teacher, ids) < 0.7 * before
    assert all(torch.equal(p, frozen[n]) for n, p in out.named_parameters() if n in frozen)
    report = state_of(out).history[-1].report
    assert report["kl_last"] < report["kl_first"] and report["trained_params"] < sum(p.numel() for p in out.parameters())
    assert all(p.requires_grad for p in out.parameters())  # restored after training


def test_fixed_seed_is_deterministic_and_the_seed_matters() -> None:
    teacher = tiny_qwen3()
    runs = [_distill(_pruned(tiny_qwen3()), teacher, seed=s) for s in (0, 0, 1)]
    params = [torch.cat([p.flatten() for p in m.parameters()]) for m in runs]
    assert torch.equal(params[0], params[1]) and not torch.equal(params[0], params[2])


def test_micro_batches_take_the_same_steps_as_whole_batches() -> None:
    """Gradients summed over micro-batches, each weighted by its share of the step, are the whole batch's: the same
    weights up to float rounding, with activations for ``micro_batch_size`` windows only (an odd split included)."""
    teacher = tiny_qwen3()
    base = _pruned(tiny_qwen3())
    runs = [_distill(copy.deepcopy(base), teacher, batch_size=6, micro_batch_size=m, steps=5) for m in (None, 2, 4)]
    params = [torch.cat([p.detach().flatten() for p in m.parameters()]) for m in runs]
    moved = (params[0] - torch.cat([p.detach().flatten() for p in base.parameters()])).abs().max()
    assert moved > 1e-3
    for other in params[1:]:
        assert torch.allclose(other, params[0], atol=1e-5, rtol=0)
    reports = [state_of(m).history[-1].report for m in runs]
    assert all(r["kl_first"] == pytest.approx(reports[0]["kl_first"], rel=1e-4) for r in reports)


def test_train_routers_moves_only_the_routers() -> None:
    teacher = tiny_qwen3()
    model = _pruned(tiny_qwen3())
    spec = state_of(model).spec
    routers = {n for b in spec.blocks for n, _ in model.get_submodule(b.router.path).named_parameters(prefix=b.router.path)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _distill(model, teacher, train="routers")
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == routers and state_of(model).history[-1].report["trained_params"] == sum(before[n].numel() for n in routers)


def test_train_all_moves_attention_too() -> None:
    teacher = tiny_qwen3()
    model = _pruned(tiny_qwen3())
    q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    _distill(model, teacher, train="all")
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, q)


def test_adapters_recover_and_fold_into_stock_weights(micro_path) -> None:
    """``train="adapters"`` on the trained micro model, half its experts dropped: the KL falls, only the experts and
    routers move, and afterwards the model holds plain tensors of the same names and shapes (a stock checkpoint)."""
    teacher = load_model(micro_path, dtype="float32")
    ids = torch.randint(2, teacher.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    model = _pruned(copy.deepcopy(teacher), windows=ids)
    shapes = {n: t.shape for n, t in model.state_dict().items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    kl_before = _kl(model, teacher, ids)
    factors, direct = adapter_parameter_count(model, state_of(model).spec, 8)
    out = Distill(teacher=teacher, data=ids, steps=15, lr=3e-3, batch_size=4, train="adapters", rank=8, show_progress=False)(model)
    assert _kl(out, teacher, ids) < 0.8 * kl_before
    assert {n: t.shape for n, t in out.state_dict().items()} == shapes
    assert not any(parametrize.is_parametrized(m) for m in out.modules())
    moved = {n for n, p in out.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(".mlp.experts." in n or ".mlp.gate." in n for n in moved)
    report = state_of(out).history[-1].report
    assert report["trained_params"] == factors + direct and report["adapter_rank"] == 8
    assert factors < sum(before[n].numel() for n in before if ".mlp.experts." in n) and all(p.requires_grad for p in out.parameters())


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3", "granitemoe"])
def test_adapters_on_other_layouts(family: str) -> None:
    """Transposed fused weights with biases (GPT-OSS), shared experts (DeepSeek-V3), a 3D parameter per projection
    in its own module (GraniteMoE): the adapted weights move, keep their shapes, and no parametrization is left."""
    teacher = tiny_model(family).eval()
    ids = torch.randint(2, 100, (4, 16), generator=torch.Generator().manual_seed(1))
    model = _pruned(copy.deepcopy(teacher), windows=ids)
    spec = state_of(model).spec
    experts = {n: p.detach().clone() for b in spec.blocks for n, p in model.get_submodule(b.experts.path).named_parameters(prefix=b.experts.path)}
    Distill(teacher=teacher, data=ids, steps=3, lr=1e-2, batch_size=4, train="adapters", rank=2, show_progress=False)(model)
    after = dict(model.named_parameters())
    assert all(after[n].shape == t.shape for n, t in experts.items()) and any(not torch.equal(after[n], t) for n, t in experts.items())
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_adapters_fold_exactly_and_leave_nothing_after_a_failure() -> None:
    """Folding ``W + B A`` gives the logits the adapted model computed; an error inside drops the update."""
    model = _pruned(tiny_qwen3())
    spec = state_of(model).spec
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), low_rank_adapters(model, spec, rank=3) as (factors, _):
        for f in factors:
            f.copy_(torch.randn(f.shape, generator=g) * 0.05)
        adapted = model(input_ids=WINDOWS).logits
    assert torch.allclose(model(input_ids=WINDOWS).logits, adapted, atol=1e-5)
    folded = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert any(not torch.equal(folded[n], weights[n]) for n in weights)
    with pytest.raises(RuntimeError, match="boom"), low_rank_adapters(model, spec, rank=3) as (factors, _):
        with torch.no_grad():
            factors[1].add_(1.0)
        raise RuntimeError("boom")
    assert all(torch.equal(p, folded[n]) for n, p in model.named_parameters()) and folded.keys() == weights.keys()


@pytest.mark.parametrize("train", ["all", "adapters"])
def test_zero_padded_channels_stay_zero(train: str) -> None:
    """Per-expert widths are stored padded with zeros; training must not fill the padding."""
    teacher = tiny_qwen3()
    model = tiny_qwen3()
    spec = trace(model)
    g = torch.Generator().manual_seed(0)
    plan = ChannelPlan({b.path: [sorted(torch.randperm(16, generator=g)[: 3 + e].tolist()) for e in range(b.num_experts)] for b in spec.blocks}, multiple=8)
    PruneChannels(plan=plan)(model)
    experts = model.model.layers[0].mlp.experts
    zero_before = [(t == 0) for t in (experts.gate_up_proj, experts.down_proj)]
    assert any(bool(z.any()) for z in zero_before)
    _distill(model, teacher, train=train)
    for t, z in zip((experts.gate_up_proj, experts.down_proj), zero_before):
        assert bool((t[z] == 0).all())


def test_bad_options_fail_clearly() -> None:
    model = _pruned(tiny_qwen3())
    with pytest.raises(BadOptionError, match="teacher="):
        Distill(data=WINDOWS)(model)
    with pytest.raises(BadOptionError, match="train must be one of"):
        Distill(teacher=tiny_qwen3(), data=WINDOWS, train="router-only")(model)
    with pytest.raises(BadOptionError, match="rank"):
        Distill(teacher=tiny_qwen3(), data=WINDOWS, train="adapters", rank=0)(model)
    with pytest.raises(BadOptionError, match="steps must be"):
        Distill(teacher=tiny_qwen3(), data=WINDOWS, steps=-1)(model)
    with pytest.raises(BadOptionError, match="micro_batch_size >= 1"):
        Distill(teacher=tiny_qwen3(), data=WINDOWS, micro_batch_size=0)(model)
    other = copy.deepcopy(tiny_qwen3())
    other.config.vocab_size = 99
    with pytest.raises(BadOptionError, match="vocabulary"):
        Distill(teacher=other, data=WINDOWS, steps=1)(model)
