"""``obs`` channel scorer: greedy Optimal Brain Surgeon on each expert's own output, gradient-free and layer-local.

What: for expert ``e`` of a block, ``A`` holds its routing-weighted intermediate activations on the sampled tokens
routed to it (``w_t * a_t``, the ``inputs`` observer's sample re-routed among the current experts) and ``D`` its
down projection (``D^T [I, H]``). Removing channel ``j`` and re-solving the other channels' down columns for the
least-squares error ``||A (D'^T - D^T)||^2`` costs ``||D_j||^2 / [G^-1]_jj`` with ``G = A^T A`` (damped by
``damp`` x its mean diagonal), and the optimal update is ``D^T -= G^-1[:, j] D_j / [G^-1]_jj`` (structured OBS:
ZipLM, SlimGPT). Channels are removed greedily, cheapest first, updating ``G^-1`` and the weights after each;
a channel's score is the running maximum of the costs up to its removal (nudged to increase strictly), divided by the block's output energy on
the sample, so every expert's channels are ordered by when OBS would remove them and scores compare across the
experts of a block (a marginal error in the same output space).

Why: channel scorers that read only activations (``activation``, ``coverage``) ignore that the kept channels can
take over part of a removed one's output, which :class:`~moe_fx.passes.CompensateExperts` then refits; Fisher and
HEAPr account for the loss but need the whole model's gradient, so they cannot stream. OBS ranks channels by the
error that is left *after* the refit, from forward statistics of one layer. On qwen3moe-bench (uniform widths,
then compensation) it loses +0.114 / +0.350 NLL at 25% / 50% of the routed parameters removed, against Fisher's
+0.108 / +0.335 and activation's +0.130 / +0.417 (``docs/methods/channels.md``).

Cost: per block one ``[I, I]`` Gram matrix and inverse per expert and ``I`` low-rank updates of two ``[I, I]``
matrices (the inverse and ``D^T D``, which stands for the ``[I, H]`` weights: ``||D_j||^2`` is its diagonal), in
float64 on the weights' device, experts batched and the updates folded in every 64 removals
(:func:`obs_elimination`): 0.9 s a layer of 128 experts of width 768 on an H200, 16 s for 28 such experts on 2 CPU
cores; the sample is the one compensation reads (``samples x (2H + E + 2k)`` floats a block).

Limits: the error is block-local (no loss weighting); the experts must compute ``down(gating(gate, up))``
(:class:`~moe_fx.model.expert_math.ExpertMath`) with the routing weight outside the expert (Llama 4's prescaled
experts are refused, as for the other channel scorers); after a drop, the routing rule must be one
:func:`~moe_fx.model.routing.route` re-applies.
"""

from __future__ import annotations

import torch

from moe_fx.errors import BadOptionError, UnsupportedFamilyError
from moe_fx.model.expert_math import ExpertMath
from moe_fx.model.spec import MoEBlockSpec, MoEModelSpec
from moe_fx.model.tensors import get_tensor
from moe_fx.score.base import register_scorer
from moe_fx.score.channel import ChannelScorer
from moe_fx.score.sample import INPUT_NEEDS, inputs_sample, rerouted, routes_by_expert

_CHUNK_BYTES = {"cpu": 1 << 28, "cuda": 1 << 31}
"""Experts eliminated together: their two ``[I, I]`` float64 matrices take at most this many bytes (256 MiB on the
CPU; 2 GiB on a GPU, where a step's cost is its ~20 kernel launches whatever the chunk: all 128 experts of width 768
at once)."""


class _Elimination:
    """The state of :func:`obs_elimination` for a chunk of experts, every tensor updated in place (so that a block of
    steps can be captured once as a CUDA graph and replayed)."""

    def __init__(self, grams: torch.Tensor, gram_w: torch.Tensor, damp: float, block: int) -> None:
        n_exp, width, _ = grams.shape
        dev, dtype = grams.device, grams.dtype
        eye = torch.eye(width, dtype=dtype, device=dev)
        scale = grams.diagonal(dim1=1, dim2=2).mean(1).clamp(min=1e-30)
        self.inv = torch.linalg.inv(grams + damp * scale[:, None, None] * eye)
        self.gram_w = gram_w.clone()
        self.d_inv, self.d_w = self.inv.diagonal(dim1=1, dim2=2).clone(), self.gram_w.diagonal(dim1=1, dim2=2).clone()
        self.rows = torch.arange(n_exp, device=dev)
        self.alive = torch.ones(n_exp, width, dtype=torch.bool, device=dev)
        self.running = torch.zeros(n_exp, dtype=dtype, device=dev)
        self.costs = torch.zeros(n_exp, width, dtype=dtype, device=dev)
        self.one, self.zero = torch.ones((), dtype=dtype, device=dev), torch.zeros((), dtype=dtype, device=dev)
        # since the last fold: inv -= gains @ cols^T;  D^T D -= gains @ vs^T + vs @ gains^T
        self.gains, self.cols, self.vs = (torch.zeros(n_exp, width, block, dtype=dtype, device=dev) for _ in range(3))
        self.block = block

    def step(self, m: int) -> None:
        """Remove each expert's cheapest channel; ``m`` updates are pending since the last fold."""
        rows, gains, cols, vs = self.rows, self.gains, self.cols, self.vs
        cost = (self.d_w / self.d_inv).masked_fill(~self.alive, float("inf"))
        j = cost.argmin(1)
        torch.maximum(self.running * (1 + 2**-40), cost[rows, j], out=self.running)
        self.costs[rows, j] = self.running
        col, w_j = self.inv[rows, :, j], self.gram_w[rows, :, j]  # [E, I] columns j of the folded matrices (both symmetric)
        if m:
            col = col - torch.bmm(gains[:, :, :m], cols[rows, j, :m, None]).squeeze(-1)
            w_j = (w_j - torch.bmm(gains[:, :, :m], vs[rows, j, :m, None]).squeeze(-1)
                   - torch.bmm(vs[:, :, :m], gains[rows, j, :m, None]).squeeze(-1))
        gain = col / col[rows, j][:, None]  # D^T -= gain D_j: the other channels take over channel j
        v = w_j - 0.5 * gain * w_j[rows, j][:, None]
        gains[:, :, m], cols[:, :, m], vs[:, :, m] = gain, col, v
        self.d_inv -= gain * col
        self.d_w -= 2 * gain * v
        self.alive.scatter_(1, j[:, None], False)  # a fill kernel: indexing with a Python False would copy it from the host
        self.d_inv[rows, j], self.d_w[rows, j] = self.one, self.zero  # removed: keeps the division finite, masked anyway

    def fold(self) -> None:
        """Fold the ``block`` pending updates into the two matrices (one rank-``block`` product each)."""
        self.inv.baddbmm_(self.gains, self.cols.transpose(1, 2), alpha=-1)
        self.gram_w.baddbmm_(self.gains, self.vs.transpose(1, 2), alpha=-1).baddbmm_(self.vs, self.gains.transpose(1, 2), alpha=-1)

    def full_block(self) -> None:
        for m in range(self.block):
            self.step(m)
        self.fold()


@torch.no_grad()
def obs_elimination(grams: torch.Tensor, gram_w: torch.Tensor, damp: float, block: int = 64, graphs: bool = False) -> torch.Tensor:
    """``[E, I]`` costs of greedy structured OBS, per expert: the running maximum of ``||D_j||^2 / [G^-1]_jj`` at
    each channel's removal (see the module doc), nudged to increase strictly (ties would fall back to channel ids).
    ``grams``: ``G = A^T A`` ``[E, I, I]``; ``gram_w``: ``D^T D`` ``[E, I, I]`` (``D^T [I, H]`` the down projection,
    neurons as rows); both float64.

    Each removal changes both ``[I, I]`` matrices by a rank-one (the inverse) and a rank-two (``D^T D``) update, but a
    step reads only their diagonals and the removed channel's two columns. So the updates are kept as ``[E, I, m]``
    factors, the columns rebuilt from them, and folded into the matrices every ``block`` removals in one rank-``block``
    product (the lazy batch updates of GPTQ): a step reads ``O(E I block)`` values instead of rewriting ``O(E I^2)``,
    which made the elimination memory-bound on a GPU (``tests/test_channels.py`` checks it against the one-step form).

    ``graphs`` (CUDA, at least two blocks of channels): the first block runs as it is (the warm-up), the next is
    captured once as a CUDA graph and replayed for every later block: a step is about 20 small kernels that the
    host otherwise launches one by one, 768 steps a layer at Qwen3-30B-A3B's widths. The replay runs the same kernels
    on the same buffers: 128 experts of width 768 on an H100, 0.50 -> 0.22 s with identical costs
    (``benchmarks/obs_elimination.py``, ``benchmarks/results/obs_elimination_h100.json``); the scorer uses it."""
    width = grams.shape[1]
    state = _Elimination(grams, gram_w, damp, block)
    full = width // block
    start = 0
    if graphs and grams.is_cuda and full >= 2:
        side = torch.cuda.Stream(grams.device)
        side.wait_stream(torch.cuda.current_stream(grams.device))
        with torch.cuda.stream(side):
            state.full_block()
        torch.cuda.current_stream(grams.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            state.full_block()  # recorded, not run
        for _ in range(full - 1):
            graph.replay()
        start = full * block
    m = 0
    for _ in range(start, width):
        state.step(m)
        m += 1
        if m == block:
            state.fold()
            m = 0
    return state.costs


@register_scorer
class ObsScorer(ChannelScorer):
    """Channel importance by greedy structured OBS on each expert's output (see the module doc); ``damp``: the
    Gram matrix's damping relative to its mean diagonal (0.01: it beat 0.1 in 3 of 4 settings on held-out train
    windows of qwen3moe-bench, ``benchmarks/results/compensation_ridge_obs_cpu.json``)."""

    name = "obs"
    observers = ("inputs",)
    needs = INPUT_NEEDS

    def __init__(self, seed: int = 0, damp: float = 0.01) -> None:
        super().__init__(seed)
        if not damp > 0:
            raise BadOptionError(f"obs damp must be > 0 (relative to the Gram matrix's mean diagonal), got {damp}")
        self.damp = damp

    def check(self, spec: MoEModelSpec) -> None:
        for block in spec.blocks:
            if block.experts.call_style == "dense_prescaled":
                raise UnsupportedFamilyError(
                    f"{block.path}: its experts scale their input by the routing weight (Llama 4), which the obs channel "
                    "scorer does not model; use --granularity expert"
                )

    def score_block(self, stats, block: MoEBlockSpec) -> torch.Tensor:
        if self.model is None:
            raise BadOptionError("the obs scorer reads the experts' weights: call it with the model (Score does)")
        sample = inputs_sample(stats, block)
        kept = self.positions(block, sample["input_logits"].shape[1])
        math = ExpertMath(self.model, block.experts)
        device = get_tensor(self.model, block.experts.down).device
        x = sample["input_hidden"].to(device, torch.float64)
        idx, w = (t.to(device) for t in rerouted(block, sample, kept, "the obs channel scorer"))
        width = block.experts.intermediate_size
        energy = max(float((sample["input_target"].double() ** 2).sum()), 1e-30)
        chunk = max(1, _CHUNK_BYTES.get(device.type, _CHUNK_BYTES["cpu"]) // (2 * width * width * 8))
        routes = routes_by_expert(idx, block.num_experts)
        scores = []
        for start in range(0, block.num_experts, chunk):
            experts = range(start, min(start + chunk, block.num_experts))
            grams = torch.zeros(len(experts), width, width, dtype=torch.float64, device=device)
            gram_w = torch.zeros_like(grams)
            for i, e in enumerate(experts):
                dt = math.down(e, x)
                gram_w[i] = dt @ dt.T
                if e in routes:
                    t, s = routes[e]
                    a = w[t, s, None].double() * math.activations(e, x[t])
                    grams[i] = a.T @ a
            scores.append(obs_elimination(grams, gram_w, self.damp, graphs=True) / energy)
        return torch.cat(scores)
