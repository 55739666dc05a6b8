"""CompensateExperts: refit the kept experts' down projections so the pruned block reproduces the original.

What: run after :class:`~moe_fx.passes.DropExperts` (or MergeExperts). For every block, on a seeded sample of
calibration tokens recorded on the *original* model by the ``inputs`` observer (experts input ``x``, raw
router logits, the routed output ``target = sum_slots w * y``), the tokens are re-routed among the kept
experts with the family's routing rule (:func:`moe_fx.model.routing.route`), each kept expert's intermediate
activation ``a = act(gate(x)) * up(x)`` (non-gated: ``act(up(x))``, biases included) is computed from the
current weights, and new down projections ``D_e`` are solved by block-coordinate ridge least squares::

    min  sum_t || sum_{e in routes(t)} w_te (D_e a_te + b_e) - target_t ||^2  +  sum_e lam_e ||D_e - D_e0||_F^2

``lam_e = ridge * trace(A^T A) / I`` (``A``: rows ``w_te a_te`` of expert ``e``'s tokens), so ``ridge`` is
relative to the expert's own activation energy. Per expert, with the other experts held fixed and ``Z`` the
residual target of its tokens, ``D_e^T = (A^T A + lam I)^-1 (A^T Z + lam D_e0^T)``; ``sweeps`` passes over the
experts of a block. Gate/up weights, router and biases are untouched. Where the weight scales the expert's
input instead (Llama 4: ``expert(w x)``), ``a_te`` is the activation of ``w_te x_t`` and the factor ``w_te`` is 1:
the output is still linear in ``D_e``.

Why: after dropping, the tokens a dropped expert served go to other experts, which never learned to do its
job. The refit lets the kept experts absorb the part of the dropped experts' output that is linear in
their own (fixed) activations, on exactly the tokens that now reach them. The ridge pull towards the
original weights keeps what each expert does on the tokens it always served.

Cost: per block one forward of every kept expert's up/gate on its sampled tokens, one Cholesky factorization of
each kept expert's ``I x I`` float64 system (batched over experts, O(n I^2 + I^3)) and, per sweep and expert, two
triangular solves (O(n I H + I^2 H)); seconds on the CPU for small models, on the model's device otherwise. The
``inputs`` observer holds ``samples x (2H + E + 2k)`` floats per block on the CPU. The refit holds, in float64 on
the device, the sample's inputs, targets and reconstruction (``3 x samples x H``) and every routed row's
activations (``samples x k x I``) and the factors (``experts x I x I``: 0.6 GB for 128 experts of width 768); each
expert's contribution is recomputed from its activations when it is refit rather than kept per slot (which took
``samples x k x H`` twice more: 2.5 GB against 0.7 GB of peak CPU memory for 16,384 samples of 64 experts of width
256 at hidden 1024, the same weights to the bit).

Limits: the fit is block-local on the sample (no end-to-end loss), only the down projection moves, and a
too small ``ridge`` overfits the sample. Needs experts whose output is ``down(gating(gate, up))`` with the
module's own gating (:class:`~moe_fx.model.expert_math.ExpertMath`: SwiGLU, GPT-OSS's clamped GLU, non-gated, biases)
in any layout :func:`neuron_tensors` reads, and a routing rule :func:`route` re-applies (group-limited routing
included). Families outside that (a norm after each expert's down projection) are refused with
:class:`UnsupportedFamilyError` before any pass runs (:meth:`CompensateExperts.check_model`); the reconstruction
is also checked against the experts module itself on the sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from moe_fx.errors import BadOptionError, UnsupportedFamilyError
from moe_fx.model.expert_math import ExpertMath, check_expert_math
from moe_fx.model.routing import check_group_simulation
from moe_fx.model.spec import MoEBlockSpec, MoEModelSpec
from moe_fx.model.tensors import get_tensor, set_tensor
from moe_fx.pipeline import MoEState, Pass, PassResult, require
from moe_fx.score.sample import INPUT_NEEDS, inputs_sample, rerouted, routes_by_expert

__all__ = ["CompensateExperts", "RidgeSystem", "compensate_block", "ridge_refit", "ridge_systems"]

_CHECK_TOL = 2e-2
"""Largest relative error of the reconstructed experts output against the experts module's own output."""


@torch.no_grad()
def compensate_block(
    model: nn.Module, block: MoEBlockSpec, sample: dict[str, torch.Tensor], kept: torch.Tensor | None, *, ridge: float, sweeps: int,
    constants: dict[int, torch.Tensor] | None = None,
) -> dict:
    """Refit the down projections of ``block``'s current experts (into a new tensor; see module doc); return the
    relative reconstruction error of the sample before and after, and the tokens used.

    ``constants``: experts substituted by a constant output (:class:`~moe_fx.passes.SubstituteExperts`; the routing
    is then the recorded one, ``kept`` None). Each stands in for its expert from the start, and the sweeps refit it
    too, to the routing-weighted mean of its tokens' residual target; the dict is updated in place."""
    down = get_tensor(model, block.experts.down)
    # the refit writes into a copy: a tensor shared with another model (a view being measured) stays as it was
    set_tensor(model, block.experts.down, down.detach().clone())
    device = down.device
    idx, w = rerouted(block, sample, kept, "CompensateExperts")
    math = ExpertMath(model, block.experts)
    dtype = torch.float64
    x = sample["input_hidden"].to(device, dtype)
    target = sample["input_target"].to(device, dtype)
    idx, w = idx.to(device), w.to(device, dtype)
    n = idx.shape[0]
    prescaled = block.experts.call_style == "dense_prescaled"
    # the block's reconstructed output and, per expert, its rows' activations: each expert's own contribution is
    # recomputed from them when it is refit, so nothing of size tokens x slots x hidden is held
    total = torch.zeros_like(target)
    rows: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for e, (t, s) in routes_by_expert(idx, block.num_experts).items():  # a token reaches an expert once: t has no repeats
        # the expert's input and the factor on its output: (x, w), or (w x, 1) where the weight scales the input (Llama 4)
        xe, ws = (w[t, s, None] * x[t], torch.ones_like(w[t, s, None])) if prescaled else (x[t], w[t, s, None])
        rows[e] = (t, ws, math.activations(e, xe))
        total[t] += ws * math.project(e, rows[e][2])
    _check_reconstruction(model, block, x, idx, w, total)
    constants = {} if constants is None else constants
    for e, c in constants.items():  # a substituted expert's constant stands in for its output from here on
        if e in rows:
            t, ws, a = rows[e]
            total[t] += ws * (c - math.project(e, a))
            rows[e] = (t, ws, None)
    norm = max(float((target**2).sum()), 1e-30)
    before = float(((total - target) ** 2).sum()) / norm
    refit = [e for e, (_, _, a) in rows.items() if a is not None]
    systems = dict(zip(refit, ridge_systems([rows[e][1:] for e in refit], ridge)))
    for _ in range(sweeps):
        for e, (t, ws, a) in rows.items():
            if a is None:
                own = ws * constants[e]
                constants[e] = (ws * (target[t] - (total[t] - own))).sum(0) / (ws**2).sum().clamp(min=1e-30)
                total[t] += ws * constants[e] - own
                continue
            b = math.down_bias(e, x)
            own = ws * math.project(e, a)
            Z = target[t] - (total[t] - own) - (0 if b is None else ws * b)
            math.set_down(e, systems[e].solve(ws * a, Z, math.down(e, x)))
            total[t] += ws * math.project(e, a) - own
    after = float(((total - target) ** 2).sum()) / norm
    return {"tokens": n, "experts_refit": len(rows), "error_before": round(before, 6), "error_after": round(after, 6)}


_FACTOR_CHUNK_BYTES = {"cpu": 1 << 28, "cuda": 1 << 30}
"""Systems factorized in one batched call: their stacked ``[I, I]`` float64 Gram matrices and factors take at most
this many bytes (256 MiB on the CPU, 1 GiB on a GPU)."""


@dataclass(frozen=True)
class RidgeSystem:
    """One expert's ridge system ``A^T A + lam I``, factorized once: the sweeps change only its right-hand side
    ``A^T Z + lam d0`` (the expert's rows and activations stay), so a sweep costs two triangular solves per expert
    instead of a factorization. Cholesky; LU (``pivots``) where Cholesky failed (``ridge`` 0 and a Gram matrix
    singular to rounding)."""

    factor: torch.Tensor
    lam: torch.Tensor
    pivots: torch.Tensor | None = None

    def solve(self, A: torch.Tensor, Z: torch.Tensor, d0: torch.Tensor) -> torch.Tensor:
        """``D^T [I, H]`` minimising ``||A D^T - Z||^2 + lam ||D^T - d0||^2`` for this system's rows ``A [n, I]``."""
        rhs = A.T @ Z + self.lam * d0
        if self.pivots is None:
            return torch.cholesky_solve(rhs, self.factor)
        return torch.linalg.lu_solve(self.factor, self.pivots, rhs)


def ridge_systems(rows: Sequence[tuple[torch.Tensor, torch.Tensor]], ridge: float) -> list[RidgeSystem]:
    """The ridge systems of experts whose rows are ``ws * a`` (``ws [n, 1]`` routing weights, ``a [n, I]``
    activations), ``lam = ridge * trace(A^T A) / I`` plus a 1e-10 relative jitter so that an expert with dead
    neurons still solves. Experts of one width are factorized together, in chunks of :data:`_FACTOR_CHUNK_BYTES`:
    one batched call and one value read back (whether any factorization failed) per chunk. A solve per expert and
    sweep took 3.8x longer at Qwen3-30B-A3B's shapes on an H100 (``benchmarks/refit_solves.py``, in its first form:
    the same algorithm written in the benchmark)."""
    systems: list[RidgeSystem | None] = [None] * len(rows)
    by_width: dict[int, list[int]] = {}
    for i, (_, a) in enumerate(rows):
        by_width.setdefault(a.shape[1], []).append(i)
    for width, members in by_width.items():
        device = rows[members[0]][1].device.type
        per_chunk = max(1, _FACTOR_CHUNK_BYTES.get(device, _FACTOR_CHUNK_BYTES["cpu"]) // (2 * width * width * 8))
        for start in range(0, len(members), per_chunk):
            chunk = members[start:start + per_chunk]
            grams = torch.stack([rows[i][1].T @ (rows[i][0] ** 2 * rows[i][1]) for i in chunk])
            trace = grams.diagonal(dim1=1, dim2=2).sum(-1)
            lam = ridge * trace / width
            grams.diagonal(dim1=1, dim2=2).add_((lam + 1e-10 * trace.clamp(min=1e-30) / width)[:, None])
            factors, info = torch.linalg.cholesky_ex(grams)
            for j, i in enumerate(chunk):
                systems[i] = RidgeSystem(factors[j], lam[j])
            for j in info.nonzero().flatten().tolist():
                lu, pivots = torch.linalg.lu_factor(grams[j])
                systems[chunk[j]] = RidgeSystem(lu, lam[j], pivots)
    return systems


def ridge_refit(A: torch.Tensor, Z: torch.Tensor, d0: torch.Tensor, ridge: float) -> torch.Tensor:
    """``D^T [I, H]`` minimising ``||A D^T - Z||^2 + lam ||D^T - d0||^2`` for rows ``A [n, I]`` (routing-weighted
    activations) and targets ``Z [n, H]`` (one system: :func:`ridge_systems`)."""
    return ridge_systems([(A.new_ones(len(A), 1), A)], ridge)[0].solve(A, Z, d0)


def _check_reconstruction(model, block, x, idx, w, predicted) -> None:
    """Refuse if the reconstructed experts output differs from what the experts module computes."""
    module = model.get_submodule(block.experts.path)
    dtype = get_tensor(model, block.experts.down).dtype
    m = min(len(x), 256)
    if block.experts.call_style == "dense_prescaled":  # hidden * score stacked over experts, the score 0 off the route
        scores = torch.zeros(block.num_experts, m, 1, dtype=w.dtype, device=w.device)
        scores[idx[:m].T, torch.arange(m, device=w.device)] = w[:m].T.unsqueeze(-1)
        real = module((x[:m] * scores).reshape(-1, x.shape[1]).to(dtype)).view(block.num_experts, m, -1).sum(0).to(predicted.dtype)
    else:
        real = module(x[:m].to(dtype), idx[:m], w[:m].to(dtype)).to(predicted.dtype)
    err = float((real - predicted[:m]).norm() / real.norm().clamp(min=1e-30))
    tol = _CHECK_TOL if dtype == torch.float32 or dtype == torch.float64 else 5 * _CHECK_TOL
    if err > tol:
        raise UnsupportedFamilyError(
            f"{block.path}: reconstructing {type(module).__name__}'s output as down(act(gate) * up) is off by "
            f"{err:.3g} (relative); expert compensation does not support this experts implementation"
        )


@dataclass
class CompensateExperts(Pass):
    """Refit the kept experts' down projections to reproduce the original block output (see module doc).

    Run after DropExperts/MergeExperts, with calibration recorded on the unpruned model by the ``inputs``
    observer: ``compose(Calibrate(data, observers=("routing", "reap", "inputs")), Score("reap"),
    DropExperts(ratio=0.25), CompensateExperts())``. ``ridge``: strength of the pull towards the current
    weights, relative to each expert's activation energy (default 1.0: best mean NLL on held-out *train* tokens
    over REAP 25% and 50% on qwen3moe-bench among 0.3-30, with 16,384 sampled tokens per block;
    ``benchmarks/compensation_ridge.py``); ``sweeps``: block-coordinate passes per block.
    """

    ridge: float = 1.0
    sweeps: int = 2
    name = "compensate_experts"

    def requires(self, state: MoEState) -> None:
        require(state.stats is not None, self.name, "calibration samples of block inputs and outputs",
                "Calibrate(observers=(..., 'inputs'))")
        missing = [b.path for b in state.spec.blocks if not all(k in state.stats.per_block.get(b.path, {}) for k in INPUT_NEEDS)]
        require(not missing, self.name, f"the 'inputs' calibration sample (missing for {missing[:2]})",
                "Calibrate(observers=(..., 'inputs'))")

    def check_model(self, model: nn.Module, spec: MoEModelSpec) -> None:
        """Experts whose output is ``down(activations)`` and a routing rule :func:`route` re-applies after the drop."""
        for block in spec.blocks:
            check_expert_math(model.get_submodule(block.experts.path), block.experts, linear_down=True)
            check_group_simulation(block.router)

    def check_layerwise(self) -> None:
        """Each block is refit on its own sample: layer-local."""

    def run(self, model: nn.Module, state: MoEState) -> PassResult:
        if self.ridge < 0 or self.sweeps < 1:
            raise BadOptionError(f"ridge must be >= 0 and sweeps >= 1, got {self.ridge} and {self.sweeps}")
        blocks = {}
        for block in state.spec.blocks:
            sample = inputs_sample(state.stats, block)
            if len(sample["input_hidden"]) == 0:
                continue
            kept = state.recorded_positions(block, sample["input_logits"].shape[1])
            blocks[block.path] = compensate_block(model, block, sample, kept, ridge=self.ridge, sweeps=self.sweeps)
        mean = lambda key: round(sum(b[key] for b in blocks.values()) / len(blocks), 6) if blocks else None
        return PassResult(model, bool(blocks), {
            "blocks": blocks, "mean_error_before": mean("error_before"), "mean_error_after": mean("error_after"),
        })
