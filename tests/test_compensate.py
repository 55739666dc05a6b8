"""CompensateExperts: least-squares refit of the kept experts' down projections after dropping experts.

The reconstruction of the experts' output must equal the experts module's own output (else the refit
optimises the wrong function); keeping every expert must change nothing; after a drop the refit must lower
the block's reconstruction error on the calibration sample and on held-out tokens.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import tiny_qwen3
from tiny_models import TINY_FAMILIES, tiny_model

from moe_fx.calibrate.data import calibration_tokens
from moe_fx.errors import PassOrderError, UnsupportedFamilyError
from moe_fx.formats.loading import load_model, load_tokenizer
from moe_fx.model.expert_math import ExpertMath
from moe_fx.model.tensors import get_tensor
from moe_fx.model.trace import trace
from moe_fx.passes import Calibrate, CompensateExperts, DropExperts, Score
from moe_fx.pipeline import compose, state_of
from moe_fx.plan.plans import PrunePlan

TOKENS = torch.randint(2, 128, (8, 32), generator=torch.Generator().manual_seed(3))
OBS = ("routing", "reap", "inputs")


def _check_math(model) -> None:
    spec = trace(model)
    gen = torch.Generator().manual_seed(0)
    for block in spec.blocks:
        module = model.get_submodule(block.experts.path)
        math = ExpertMath(model, block.experts)
        x = torch.randn(5, block.experts.hidden_size, generator=gen)
        for e in range(block.num_experts):
            with torch.no_grad():
                if block.experts.call_style == "dense_prescaled":  # Llama 4: every expert on [E * T, H], here expert e's rows
                    real = module(x.repeat(block.num_experts, 1)).view(block.num_experts, 5, -1)[e].double()
                else:
                    real = module(x, torch.full((5, 1), e, dtype=torch.long), torch.ones(5, 1)).double()
            torch.testing.assert_close(math.output(e, x.double()), real, rtol=1e-4, atol=1e-5)


def test_reconstruction_matches_experts_module_qwen3():
    _check_math(tiny_qwen3())


def test_reconstruction_matches_experts_module_non_gated():
    model = tiny_model("nemotron_h")  # non-gated ``up`` experts, relu2
    _check_math(model)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_reconstruction_matches_experts_module_every_family(family):
    """Every family's gating (GPT-OSS's clamped, interleaved GLU with biases included) is reproduced exactly;
    a family whose experts output is not ``down(activations)`` is refused by the up-front check."""
    model = tiny_model(family)
    spec = trace(model)
    if getattr(model.get_submodule(spec.blocks[0].experts.path), "has_post_expert_norm", False):
        with pytest.raises(UnsupportedFamilyError, match="normalises each expert's output"):
            CompensateExperts().check_model(model, spec)
        return
    CompensateExperts().check_model(model, spec)
    _check_math(model)


def test_compensation_of_experts_weighted_on_their_input():
    """Llama 4 scales each expert's input by its weight (``expert(w x)``): the refit uses the activations of ``w x``,
    so it lowers the block error of a drop on the sample and on held-out tokens, as for the other families."""
    calib = torch.randint(2, 128, (64, 32), generator=torch.Generator().manual_seed(10))  # enough tokens per expert not to overfit
    original = _calibrated(tiny_model("llama4"), calib, batch_size=16)
    dropped = copy.deepcopy(original)
    DropExperts(ratio=0.25)(dropped)
    comp = copy.deepcopy(dropped)
    CompensateExperts()(comp)
    for b in state_of(comp).history[-1].report["blocks"].values():
        assert b["error_after"] < 0.9 * b["error_before"]
    held_out = torch.randint(2, 128, (4, 32), generator=torch.Generator().manual_seed(11))
    e_drop, e_comp = _held_out_error(original, dropped, held_out), _held_out_error(original, comp, held_out)
    assert all(e_comp[p] < e_drop[p] for p in e_drop), (e_drop, e_comp)


def _calibrated(model, data, **kw):
    compose(Calibrate(data, observers=OBS, show_progress=False, **kw), Score("reap"))(model)
    return model


def _downs(model):
    return {b.experts.down: get_tensor(model, b.experts.down).detach().clone() for b in state_of(model).spec.blocks}


def test_keep_all_changes_nothing():
    model = _calibrated(tiny_qwen3(), TOKENS, batch_size=4)
    before = _downs(model)
    compose(DropExperts(plan=PrunePlan.keep_all(state_of(model).spec)), CompensateExperts())(model)
    report = state_of(model).history[-1].report
    for b in report["blocks"].values():
        assert b["error_before"] < 1e-8 and b["error_after"] < 1e-8
    for name, w in _downs(model).items():
        torch.testing.assert_close(w, before[name], rtol=1e-4, atol=1e-5)


def test_missing_inputs_names_calibrate():
    model = tiny_qwen3()
    with pytest.raises(PassOrderError, match="Calibrate"):
        CompensateExperts()(model)
    compose(Calibrate(TOKENS, show_progress=False), Score("reap"), DropExperts(ratio=0.25))(model)
    with pytest.raises(PassOrderError, match="inputs"):
        CompensateExperts()(model)


def test_unsupported_router_is_refused():
    model = _calibrated(tiny_qwen3(), TOKENS, batch_size=4)
    state = state_of(model)
    for acc in state.stats.per_block.values():  # a routing the spec's rule cannot reproduce
        acc["input_topk_index"] = acc["input_topk_index"].flip(0)
    DropExperts(ratio=0.25)(model)
    with pytest.raises(UnsupportedFamilyError, match="routing rule"):
        CompensateExperts()(model)


@functools.cache
def _micro_reap(micro_path, calib_path):
    model = load_model(micro_path, dtype="float32")
    _calibrated(model, calib_path, max_tokens=8192, seq_len=256, inputs_per_block=2048)
    return model


def _held_out_error(original, pruned, tokens) -> dict[str, float]:
    """Relative error of each pruned block's routed output against the original block's, on the same inputs."""
    errors, inputs = {}, {}
    spec = state_of(pruned).spec

    def grab(path):
        def hook(module, args, kwargs):
            inputs[path] = args[0] if args else kwargs["hidden_states"]
        return hook

    handles = [original.get_submodule(b.path).register_forward_pre_hook(grab(b.path), with_kwargs=True) for b in spec.blocks]
    with torch.no_grad():
        original(input_ids=tokens, use_cache=False)
        for h in handles:
            h.remove()
        for b in spec.blocks:
            x = inputs[b.path]
            ref = original.get_submodule(b.path)(x)
            out = pruned.get_submodule(b.path)(x)
            ref, out = (r[0] if isinstance(r, tuple) else r for r in (ref, out))
            errors[b.path] = float(((out - ref) ** 2).sum() / (ref**2).sum())
    return errors


def test_compensation_lowers_error_on_sample_and_held_out(micro_path, calib_path, valid_path):
    original = _micro_reap(micro_path, calib_path)
    dropped = copy.deepcopy(original)
    DropExperts(ratio=0.25)(dropped)
    comp = copy.deepcopy(dropped)
    CompensateExperts()(comp)
    report = state_of(comp).history[-1].report
    for b in report["blocks"].values():
        assert b["error_after"] < 0.9 * b["error_before"]
    held_out = calibration_tokens(valid_path, load_tokenizer(micro_path), seq_len=128, max_tokens=2048, seed=5).input_ids
    e_drop = _held_out_error(original, dropped, held_out)
    e_comp = _held_out_error(original, comp, held_out)
    for path in e_drop:
        assert e_comp[path] < e_drop[path], (e_drop, e_comp)

    again = copy.deepcopy(dropped)
    CompensateExperts()(again)
    assert state_of(again).history[-1].report == report
    for name, w in _downs(again).items():
        assert torch.equal(w, _downs(comp)[name])


def test_routes_by_expert_match_nonzero_per_expert():
    """The one-sort grouping the refit and obs use gives each expert's routes as ``(idx == e).nonzero`` does, in
    the same order; ids beyond the block's experts (not kept) and experts without routes are left out."""
    from moe_fx.score.sample import routes_by_expert

    idx = torch.randint(0, 7, (50, 3), generator=torch.Generator().manual_seed(0))
    idx[idx == 4] = 5  # expert 4 unreached
    routes = routes_by_expert(idx, 6)
    assert sorted(routes) == [e for e in range(6) if (idx == e).any()] and 4 not in routes
    for e, (t, s) in routes.items():
        ref_t, ref_s = (idx == e).nonzero(as_tuple=True)
        assert torch.equal(t, ref_t) and torch.equal(s, ref_s)


def test_refit_solves_benchmark_runs_on_cpu(tmp_path) -> None:
    """``benchmarks/refit_solves.py`` end to end at tiny shapes: both solvers give the same refit weights."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "refit.json"
    argv = ["refit_solves.py", "--device", "cpu", "--experts", "3", "--width", "40", "--hidden", "24", "--rows", "90", "--repeats", "1",
            "--out", str(out)]
    proc = subprocess.run([sys.executable, *argv], cwd=Path(__file__).resolve().parents[1] / "benchmarks", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["max_relative_difference"] < 1e-10 and len(result["rows"]) == 2


def test_ridge_systems_solve_the_normal_equations(monkeypatch) -> None:
    """Factorized once, batched by width, each system gives the ridge solution of its own rows: the ridge
    objective's gradient vanishes (up to the 1e-10 jitter) for experts of two widths with routing weights, one of
    them rank-deficient; a system whose Cholesky factorization reports failure is factorized by LU and solves the
    same."""
    from moe_fx.rewrite import compensate

    g = torch.Generator().manual_seed(0)
    rows = [(torch.rand(n, 1, generator=g, dtype=torch.float64), torch.randn(n, width, generator=g, dtype=torch.float64))
            for n, width in [(30, 8), (5, 12), (40, 8), (25, 12)]]  # 5 rows of width 12: the ridge makes it solvable
    z = [torch.randn(len(a), 6, generator=g, dtype=torch.float64) for _, a in rows]
    d0 = [torch.randn(a.shape[1], 6, generator=g, dtype=torch.float64) for _, a in rows]
    systems = compensate.ridge_systems(rows, ridge=0.5)
    for (ws, a), system, zi, di in zip(rows, systems, z, d0):
        A = ws * a
        d = system.solve(A, zi, di)
        gradient = A.T @ (A @ d - zi) + system.lam * (d - di)
        assert system.pivots is None and gradient.abs().max() < 1e-8 * system.lam, gradient.abs().max()
        assert torch.allclose(d, compensate.ridge_refit(A, zi, di, 0.5), atol=1e-12)

    cholesky_ex = torch.linalg.cholesky_ex

    def failing_at_width_12(grams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        factors, info = cholesky_ex(grams)
        return factors, info + (grams.shape[-1] == 12)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing_at_width_12)
    fallback = compensate.ridge_systems(rows[:2], ridge=0.5)
    assert fallback[0].pivots is None and fallback[1].pivots is not None
    A = rows[1][0] * rows[1][1]
    assert torch.allclose(fallback[1].solve(A, z[1], d0[1]), systems[1].solve(A, z[1], d0[1]), atol=1e-10)
