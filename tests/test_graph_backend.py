"""moe-fx as a torch.compile backend (moe_fx.deliver.graph): matcher, instrumentation, virtual pruning, experts swap."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from tiny_models import TINY_FAMILIES, tiny_model

import moe_fx
from moe_fx.calibrate import OBSERVERS, instrument
from moe_fx.deliver.graph import ExpertsPass, InstrumentPass, MoEBackend, VirtualPrunePass, backend
from moe_fx.errors import BadOptionError, MoeFxError
from moe_fx.model.expert_weights import neuron_tensors
from moe_fx.passes import Calibrate, DropExperts, PruneChannels
from moe_fx.plan.plans import ChannelPlan, PrunePlan

FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "gpt_oss", "olmoe", "granitemoe"]
"""Standard, shared experts + gate, group-limited sigmoid + selection bias, transposed + biases + top-k-then-softmax."""

IMPLEMENTATIONS = ["grouped_mm", "batched_mm", "moe_fx"]


def _ids(batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def _keep_graph(gm, example_inputs):
    """The plainest inner backend: run the (rewritten) graph as Python."""
    return gm.forward


def _compiled(model, passes=(), inner=_keep_graph, **kw):
    torch._dynamo.reset()
    be = backend(passes, inner, model=model, **kw)
    return torch.compile(model, backend=be, fullgraph=True), be


def _model(family: str, implementation: str = "grouped_mm", **overrides):
    model = tiny_model(family, **overrides)
    model.set_experts_implementation(implementation)
    return model


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_matcher_finds_every_block(family, implementation):
    model = _model(family, implementation)
    compiled, be = _compiled(model)
    with torch.no_grad():
        compiled(input_ids=_ids(), use_cache=False)
    report = be.report()
    spec = moe_fx.state_of(model).spec
    assert report["unmatched"] == [] and report["absent"] == []
    assert sorted(b["block"] for b in report["matched"]) == sorted(b.path for b in spec.blocks)
    for found in report["matched"]:
        block = next(b for b in spec.blocks if b.path == found["block"])
        assert (found["top_k"], found["score"], found["experts"]) == (block.top_k, block.router.score_fn, block.num_experts)
        assert found["implementation"] == implementation


def test_moe_fx_region_on_torch_grouped_gemm_is_moe_fx(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA in bf16 moe_fx's forward calls torch's grouped GEMM itself (no moe_fx operator in the graph); the
    matcher still reports it as ``moe_fx``, not transformers' ``grouped_mm``. That choice is forced here on the CPU."""
    from moe_fx.kernels import grouped_mm

    def torch_grouped_gemm(x, weight, offsets, transposed):
        w = weight if transposed else weight.transpose(-2, -1)
        return torch.nn.functional.grouped_mm(x.to(w.dtype), w, offs=offsets)

    monkeypatch.setattr(grouped_mm, "grouped_matmul", torch_grouped_gemm)
    model = _model("qwen3_moe", "moe_fx").to(torch.bfloat16)  # torch's grouped GEMM traces in bf16 only
    compiled, be = _compiled(model)
    with torch.no_grad():
        compiled(input_ids=_ids(), use_cache=False)
    assert {b["implementation"] for b in be.report()["matched"]} == {"moe_fx"}


def _channel_prunable(model) -> bool:
    try:
        for b in moe_fx.state_of(model).spec.blocks:
            neuron_tensors(model, b.experts)
    except MoeFxError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_tiny_family_is_matched_and_virtually_pruned(family):
    """Every block is matched, or reported with a reason, or absent from the graph (never silently left out), and
    virtual pruning (experts, and channels where the layout allows) gives the physically pruned logits."""
    model = tiny_model(family)
    if not model.get_experts_implementation():
        pytest.skip(f"{family} has no switchable experts implementation (its eager loop does not compile whole)")
    spec = moe_fx.state_of(model).spec
    plan, channels = _random_plans(spec)
    channels = channels if _channel_prunable(model) else None
    compiled, be = _compiled(model, [VirtualPrunePass(plan, channels)])
    ids = _ids()
    try:
        with torch.no_grad():
            virtual = compiled(input_ids=ids, use_cache=False).logits
    except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as exc:  # raised while Dynamo traces the model
        pytest.skip(f"{family} does not compile with fullgraph=True (a loop over the experts hit): {str(exc).splitlines()[0][:100]}")
    report = be.report()
    assert all(u["reason"] for u in report["unmatched"])
    seen = {b["block"] for b in report["matched"]} | {u["path"] for u in report["unmatched"]} | set(report["absent"])
    assert {b.path for b in spec.blocks} <= seen
    if report["unmatched"]:
        pytest.skip(f"{family}: {report['unmatched'][0]['reason']}")
    pruned = copy.deepcopy(model)
    DropExperts(plan=plan)(pruned)
    if channels is not None:
        PruneChannels(plan=channels)(pruned)
    with torch.no_grad():
        torch.testing.assert_close(virtual, pruned(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)


def test_unmatched_block_is_reported_and_strict_raises():
    """Llama 4 calls its experts densely with pre-scaled inputs: reported with the reason, an error when strict."""
    model = _model("llama4", "batched_mm")
    compiled, be = _compiled(model)
    with torch.no_grad():
        compiled(input_ids=_ids(), use_cache=False)
    report = be.report()
    assert report["matched"] == [] and len(report["unmatched"]) == 2
    assert "pre-scaled" in report["unmatched"][0]["reason"]
    strict, _ = _compiled(model, strict=True)
    with pytest.raises(Exception, match="not matched"), torch.no_grad():
        strict(input_ids=_ids(), use_cache=False)


def _eager_stats(model, observers, batches):
    spec = moe_fx.state_of(model).spec
    with torch.no_grad(), instrument(model, spec, [OBSERVERS[o]() for o in observers]) as acc:
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    return {p: {k: v.clone() for k, v in a.items()} for p, a in acc.items()}


def _assert_stats_equal(got, expected):
    assert got.keys() == expected.keys()
    for path, acc in expected.items():
        assert got[path].keys() == acc.keys()
        for key, value in acc.items():
            torch.testing.assert_close(got[path][key].double(), value.double(), rtol=1e-5, atol=1e-6, msg=f"{path} {key}")


@pytest.mark.parametrize("family,observers,inner", [
    ("qwen3_moe", ("routing", "reap", "channels"), "inductor"),
    ("deepseek_v3", ("routing", "reap", "channels"), _keep_graph),
    ("gpt_oss", ("routing", "reap"), _keep_graph),  # its clamped GLU has no channel math
    ("qwen2_moe", ("routing", "reap", "channels"), _keep_graph),
])
def test_instrumented_statistics_equal_eager_hooks(family, observers, inner):
    model = _model(family, **({"num_hidden_layers": 1} if inner == "inductor" else {}))  # one layer: Inductor's compiles are the time
    batches = [_ids(2, 9, 0), _ids(2, 9, 1), _ids(1, 5, 2)]  # the last shape recompiles: same sums continue
    expected = _eager_stats(model, observers, batches)
    with torch.no_grad():
        reference = [model(input_ids=b, use_cache=False).logits for b in batches]
    pass_ = InstrumentPass(observers)
    compiled, be = _compiled(model, [pass_], inner)
    with torch.no_grad():
        outputs = [compiled(input_ids=b, use_cache=False).logits for b in batches]
    for out, ref in zip(outputs, reference):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    _assert_stats_equal(pass_.stats(), expected)
    assert be.report()["passes"][0]["rewritten"] == [b.path for b in moe_fx.state_of(model).spec.blocks]


def test_compiled_calibrate_matches_eager_on_the_trained_micro_model(micro_path, calib_path):
    """Calibrate(compiled=True) (Inductor) on real text: the same statistics as the eager hooks, up to the few routes
    that Inductor's fp32 reassociation in the rest of the model flips at near-ties (a handful of 4096 here)."""
    model = moe_fx.load(micro_path)
    options = dict(data=str(calib_path), max_tokens=2048, seq_len=128, batch_size=4, observers=("routing", "reap", "channels"),
                   show_progress=False)
    Calibrate(**options)(model)
    expected = moe_fx.state_of(model).stats.per_block
    torch._dynamo.reset()
    Calibrate(**options, compiled=True)(model)
    got = moe_fx.state_of(model).stats.per_block
    assert got.keys() == expected.keys()
    for path, acc in expected.items():
        assert got[path].keys() == acc.keys()
        assert got[path]["tokens"] == acc["tokens"] == 2048
        routes = acc["count"].sum()
        assert (got[path]["count"] - acc["count"]).abs().sum() <= 0.005 * routes
        for key in ("weight_sum", "reap_sum", "chan_abs_sum", "prob_mass"):
            assert (got[path][key] - acc[key]).abs().sum() <= 0.01 * acc[key].abs().sum(), (path, key)


def _random_plans(spec, seed=0):
    """A valid expert plan (balanced over routing groups) and a channel plan over its kept experts."""
    rng = random.Random(seed)
    kept = {}
    for b in spec.blocks:
        groups = b.router.n_group or 1
        size = b.num_experts // groups
        per_group = max(2 if groups > 1 else b.top_k, size * 3 // 4)
        kept[b.path] = [g * size + i for g in range(groups) for i in sorted(rng.sample(range(size), per_group))]
    width = {b.path: b.experts.intermediate_size for b in spec.blocks}
    channels = {p: [sorted(rng.sample(range(width[p]), rng.randint(1, width[p]))) for _ in ids] for p, ids in kept.items()}
    return PrunePlan(kept), ChannelPlan(channels)


@pytest.mark.parametrize("family", FAMILIES)
def test_virtual_pruning_equals_physical_pruning(family):
    model = _model(family)
    plan, channels = _random_plans(moe_fx.state_of(model).spec)
    ids = _ids()
    pruned = copy.deepcopy(model)
    DropExperts(plan=plan)(pruned)
    PruneChannels(plan=channels)(pruned)
    with torch.no_grad():
        expected = pruned(input_ids=ids, use_cache=False).logits
        unpruned = model(input_ids=ids, use_cache=False).logits
    for experts_plan, channel_plan in ((plan, channels), (plan, None)):
        compiled, _ = _compiled(model, [VirtualPrunePass(experts_plan, channel_plan)])
        with torch.no_grad():
            virtual = compiled(input_ids=ids, use_cache=False).logits
        if channel_plan is None:
            drop_only = copy.deepcopy(model)
            DropExperts(plan=plan)(drop_only)
            with torch.no_grad():
                torch.testing.assert_close(virtual, drop_only(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(virtual, expected, rtol=1e-5, atol=1e-5)
    assert (unpruned - expected).abs().max() > 1e-3  # the plans really change the model
    with torch.no_grad():  # the checkpoint itself is untouched
        torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, unpruned, rtol=0, atol=0)


def test_virtual_pruning_equals_the_saved_pruned_checkpoint(tmp_path):
    model = _model("qwen3_moe")
    plan, channels = _random_plans(moe_fx.state_of(model).spec, seed=3)
    pruned = copy.deepcopy(model)
    DropExperts(plan=plan)(pruned)
    PruneChannels(plan=channels)(pruned)
    from moe_fx.formats.checkpoint import save_checkpoint

    save_checkpoint(pruned, tmp_path / "pruned")
    reloaded = moe_fx.load(tmp_path / "pruned")
    compiled, _ = _compiled(model, [VirtualPrunePass(plan, channels)], "inductor")
    ids = _ids(2, 11, 4)
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids, use_cache=False).logits,
                                   reloaded(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_experts_pass_swaps_in_moe_fx(family):
    model = _model(family, "batched_mm")
    ids = _ids()
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
    seen = []

    def inner(gm, example_inputs):
        seen.append(moe_fx.deliver.graph.match_moe_blocks(gm))
        return gm.forward

    compiled, be = _compiled(model, [ExpertsPass()], inner)
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids, use_cache=False).logits, expected, rtol=1e-5, atol=1e-5)
    assert be.report()["passes"][0]["rewritten"] == [b.path for b in moe_fx.state_of(model).spec.blocks]
    assert {b.implementation for b in seen[0].blocks} == {"moe_fx"}  # the inner backend got the rewritten graph
    assert set(model.get_experts_implementation().values()) == {"batched_mm"}  # the module setting is left alone


def test_backends_compose():
    """A moe-fx backend inside another: the outer pass runs first, the inner one sees its result (and re-matches it)."""
    model = _model("qwen3_moe")
    plan, _ = _random_plans(moe_fx.state_of(model).spec)
    instrument_pass = InstrumentPass(("routing",))
    inner = MoEBackend([instrument_pass], _keep_graph, model=model)
    compiled, outer = _compiled(model, [VirtualPrunePass(plan)], inner)
    with torch.no_grad():
        compiled(input_ids=_ids(), use_cache=False)
    assert len(inner.report()["matched"]) == len(plan.kept_experts)
    for path, acc in instrument_pass.stats().items():  # the instrumented graph routes only to kept experts
        dropped = sorted(set(range(acc["count"].numel())) - set(plan.kept_experts[path]))
        assert acc["count"][dropped].sum() == 0 and acc["count"].sum() > 0


def test_registered_backend_name():
    model = _model("qwen3_moe")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moe_fx", fullgraph=True)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids, use_cache=False).logits, model(input_ids=ids, use_cache=False).logits,
                                   rtol=1e-4, atol=1e-5)


def test_bad_input_fails_clearly():
    model = _model("qwen3_moe")
    spec = moe_fx.state_of(model).spec
    with pytest.raises(BadOptionError, match="cannot run inside a compiled graph"):
        InstrumentPass(("samples",))
    with pytest.raises(BadOptionError, match="needs a PrunePlan"):
        VirtualPrunePass()
    with pytest.raises(BadOptionError, match="model=model"):
        backend([InstrumentPass()])
    block = spec.blocks[0]
    with pytest.raises(BadOptionError, match="fewer than top-k"):
        backend([VirtualPrunePass(PrunePlan({block.path: [0]}))], model=model)
    with pytest.raises(BadOptionError, match="graph passes"):
        backend([DropExperts(ratio=0.5)], model=model)
    with pytest.raises(BadOptionError, match="gradients"):
        Calibrate(data=_ids(4, 16), observers=("channel_grads",), compiled=True, show_progress=False)(model)

