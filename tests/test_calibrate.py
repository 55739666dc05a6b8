import pytest
import torch
import torch.nn.functional as F

from moe_fx import PrunePlan, compose, state_of
from moe_fx.calibrate import OBSERVERS, instrument
from moe_fx.errors import BadOptionError, PassOrderError
from moe_fx.passes import Calibrate, DropExperts, Score


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_instrumented_forward_matches_plain(tiny_model, tokens, impl):
    tiny_model.set_experts_implementation(impl)
    ref = _logits(tiny_model, tokens)
    spec = state_of(tiny_model).spec
    with instrument(tiny_model, spec, [o() for o in OBSERVERS.values()]):
        inst = _logits(tiny_model, tokens)
    torch.testing.assert_close(inst, ref, atol=1e-5, rtol=1e-5)
    for block in spec.blocks:  # hooks and patched forwards are gone
        experts = tiny_model.get_submodule(block.experts.path)
        assert "forward" not in experts.__dict__
        assert not tiny_model.get_submodule(block.router.path)._forward_pre_hooks
    torch.testing.assert_close(_logits(tiny_model, tokens), ref, atol=0, rtol=0)


@torch.no_grad()
def _brute_force_reap(model, spec, tokens):
    """Per block: count and sum of w * ||expert output|| computed from the raw weights, token by token."""
    captured = {}
    hooks = [
        model.get_submodule(b.path).register_forward_pre_hook(lambda m, a, p=b.path: captured.__setitem__(p, a[0].reshape(-1, a[0].shape[-1])))
        for b in spec.blocks
    ]
    _logits(model, tokens)
    for h in hooks:
        h.remove()
    out = {}
    for b in spec.blocks:
        h = captured[b.path].float()
        router = model.get_submodule(b.router.path)
        _, w, idx = router(h)
        experts = model.get_submodule(b.experts.path)
        count = torch.zeros(b.num_experts, dtype=torch.float64)
        reap = torch.zeros(b.num_experts, dtype=torch.float64)
        for t in range(h.shape[0]):
            for s in range(idx.shape[1]):
                e = int(idx[t, s])
                gate, up = F.linear(h[t], experts.gate_up_proj[e]).chunk(2)
                y = F.linear(F.silu(gate) * up, experts.down_proj[e])
                count[e] += 1
                reap[e] += float(w[t, s]) * float(y.norm())
        out[b.path] = (count, reap)
    return out


def test_reap_statistics_match_brute_force(tiny_model, tokens):
    m = compose(Calibrate(tokens, batch_size=2, show_progress=False))(tiny_model)
    state = state_of(m)
    expected = _brute_force_reap(m, state.spec, tokens)
    for path, (count, reap) in expected.items():
        assert torch.equal(state.stats.get(path, "count"), count)
        torch.testing.assert_close(state.stats.get(path, "reap_sum"), reap, rtol=1e-4, atol=1e-6)
        assert state.stats.get(path, "count").sum() == tokens.numel() * state.spec.blocks[0].top_k
        torch.testing.assert_close(state.stats.get(path, "prob_mass").sum(), torch.tensor(float(tokens.numel()), dtype=torch.float64))


def test_calibration_is_deterministic(tokens):
    from conftest import tiny_qwen3

    runs = []
    for _ in range(2):
        m = compose(Calibrate(tokens, show_progress=False), Score("reap"))(tiny_qwen3())
        runs.append(state_of(m).scores.per_block)
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_pass_order_and_options_are_checked(tiny_model, tokens):
    with pytest.raises(PassOrderError, match="Calibrate"):
        compose(Score("reap"))(tiny_model)
    with pytest.raises(PassOrderError, match="Score"):
        compose(DropExperts(ratio=0.5))(tiny_model)
    with pytest.raises(BadOptionError, match="unknown scoring method"):
        compose(Score("nope"))(tiny_model)
    with pytest.raises(BadOptionError, match="unknown observers"):
        compose(Calibrate(tokens, observers=("bogus",)))(tiny_model)
    with pytest.raises(BadOptionError, match="fewer than top-k"):
        compose(Score("random"), DropExperts(ratio=0.9))(tiny_model)
    with pytest.raises(BadOptionError, match=r"ratio must be in \(0, 1\)"):
        compose(Score("random"), DropExperts(ratio=1.0))(tiny_model)


def test_keep_all_is_bit_identical_and_permuted_is_close(tiny_model, tokens):
    ref = _logits(tiny_model, tokens)
    spec = state_of(tiny_model).spec
    DropExperts(plan=PrunePlan.keep_all(spec))(tiny_model)
    assert torch.equal(_logits(tiny_model, tokens), ref)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0)).tolist()
    DropExperts(plan=PrunePlan({b.path: perm for b in spec.blocks}))(tiny_model)
    torch.testing.assert_close(_logits(tiny_model, tokens), ref, atol=1e-5, rtol=1e-5)


def test_tokens_routed_to_kept_experts_are_unchanged(tiny_model):
    """norm_topk_prob: a token whose top-k experts are all kept gets exactly the same block output."""
    spec = state_of(tiny_model).spec
    block = spec.blocks[0]
    mod = tiny_model.get_submodule(block.path)
    h = torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = mod(h)
        _, _, idx = mod.gate(h.reshape(-1, 32))
    kept = [0, 1, 2, 3, 4, 5]
    DropExperts(plan=PrunePlan({b.path: kept for b in spec.blocks}))(tiny_model)
    with torch.no_grad():
        after = mod(h)
    inside = torch.isin(idx, torch.tensor(kept)).all(-1)
    assert 0 < int(inside.sum()) < 64
    torch.testing.assert_close(after.reshape(-1, 32)[inside], before.reshape(-1, 32)[inside], atol=1e-6, rtol=1e-6)


def test_pruned_model_runs_with_every_experts_implementation(tiny_model, tokens):
    spec = state_of(tiny_model).spec
    DropExperts(plan=PrunePlan({b.path: [0, 2, 5, 7] for b in spec.blocks}))(tiny_model)
    outs = {}
    for impl in ("eager", "grouped_mm", "batched_mm"):
        tiny_model.set_experts_implementation(impl)
        outs[impl] = _logits(tiny_model, tokens)
    torch.testing.assert_close(outs["grouped_mm"], outs["eager"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["batched_mm"], outs["eager"], atol=1e-5, rtol=1e-5)


def test_statistics_map_to_the_experts_left_after_a_drop(tiny_model):
    """Statistics recorded on the original experts are read through the plan; other counts are refused."""

    spec = state_of(tiny_model).spec
    DropExperts(plan=PrunePlan({b.path: [1, 3, 4, 6] for b in spec.blocks}))(tiny_model)
    state = state_of(tiny_model)
    block = state.spec.blocks[0]
    assert state.recorded_positions(block, 4) is None
    assert state.recorded_positions(block, 8).tolist() == [1, 3, 4, 6]
    with pytest.raises(BadOptionError, match="cover 6 experts"):
        state.recorded_positions(block, 6)


def _llama4():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import tiny_model

    return tiny_model("llama4")


def test_prescaled_experts_calls_are_observed():
    """Llama 4's experts take ``hidden * score`` stacked over all experts: the observers get the router's choices,
    and per slot ``y`` with ``w * y`` exactly what the expert adds (``expert(w * x)``, the weight inside), so the
    REAP sum is the norm of each expert's real contribution; the instrumented model computes what the plain one does."""
    from moe_fx.model.expert_math import ExpertMath

    model = _llama4()
    spec = state_of(model).spec
    tokens = torch.randint(3, 120, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = _logits(model, tokens)
    events = []

    class Capture(OBSERVERS["reap"]):
        def update(self, acc, event):
            events.append(event)
            super().update(acc, event)

    with instrument(model, spec, [Capture(), OBSERVERS["routing"]()]) as acc:
        torch.testing.assert_close(_logits(model, tokens), ref, atol=0, rtol=0)
    block = spec.blocks[0]
    event = events[0]
    router = model.get_submodule(block.router.path)
    scores, _ = router(event.hidden)
    idx, w = event.top_k_index, event.top_k_weights
    torch.testing.assert_close(scores.gather(1, idx), w)  # the routing the model took
    math, (t, k) = ExpertMath(model, block.experts), idx.shape
    y = event.expert_out.view(t, k, -1)
    expected = torch.stack([torch.stack([math.output(int(idx[i, s]), w[i, s] * event.hidden[i : i + 1])[0] for s in range(k)]) for i in range(t)])
    torch.testing.assert_close(w.unsqueeze(-1) * y, expected.to(y.dtype), rtol=1e-4, atol=1e-5)
    for b in spec.blocks:  # every token counted once per slot in every block
        assert int(acc[b.path]["count"].sum()) == tokens.numel() * b.top_k


def test_prescaled_experts_refuse_observers_that_assume_the_weight_outside():
    from moe_fx.errors import UnsupportedFamilyError

    model = _llama4()
    for observers in (("routing", "samples"), ("routing", "channels")):
        with pytest.raises(UnsupportedFamilyError, match="scale their input by the routing weight"):
            Calibrate(torch.zeros(1, 8, dtype=torch.long), observers=observers).check_model(model, state_of(model).spec)


def test_reservoir_slots_match_inserting_tokens_in_turn():
    """The vectorized reservoir step equals algorithm R run token by token: each accepted token overwrites the slot it
    drew, so when several tokens of one event draw the same slot the last one stays."""
    from moe_fx.calibrate.observers import _reservoir_slots

    samples, fast, slow = 16, {"seen": torch.zeros((), dtype=torch.long)}, torch.full((16,), -1)
    gen_fast, gen_slow = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    seen, duplicates = 0, 0
    for t in (10, 9, 40, 3, 64, 1):
        picked = _reservoir_slots(fast, "seen", samples, gen_fast, t)
        pos = torch.arange(seen, seen + t)
        slot = torch.where(pos < samples, pos, (torch.rand(t, generator=gen_slow, dtype=torch.float64) * (pos + 1)).long())
        expected = torch.full((samples,), -1)
        for i, s in enumerate(slot.tolist()):
            if s < samples:
                duplicates += int(expected[s] >= 0)
                expected[s] = seen + i
        before = slow.clone()
        if picked is not None:
            take, where = picked
            assert len(set(where.tolist())) == len(where)  # one token per slot
            slow[where] = take + seen
        assert torch.equal(slow, torch.where(expected >= 0, expected, before)) and (expected >= 0).any() == (picked is not None)
        seen += t
    assert int(fast["seen"]) == seen and duplicates > 0  # the case of two tokens drawing one slot was exercised


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the samples stay on the GPU only in a run on a GPU")
def test_samples_kept_on_the_gpu_equal_samples_in_cpu_memory(micro_path, monkeypatch):
    """In-memory calibration on a GPU keeps every block's token samples there (no host copy per batch): the statistics
    the passes receive, in CPU memory, are the same tensors."""
    import moe_fx.calibrate as calibrate
    from moe_fx.formats.loading import load_model

    tokens = torch.randint(3, 128, (6, 24), generator=torch.Generator().manual_seed(3))
    passes = lambda: [Calibrate(tokens, batch_size=2, observers=("routing", "reap", "samples", "inputs"), show_progress=False)]
    stats = []
    for kept in (True, False):
        if not kept:
            monkeypatch.setattr(calibrate, "keep_samples_on", lambda *a, **k: False)
        stats.append(state_of(compose(*passes())(load_model(micro_path, device="cuda"))).stats.per_block)
    for path, acc in stats[0].items():
        for key, value in acc.items():
            assert value.device.type == "cpu" and torch.equal(value, stats[1][path][key]), (path, key)
