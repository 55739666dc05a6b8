"""Low-rank adapters on the routed experts' weights: what :class:`~moe_fx.passes.Distill` trains with ``train="adapters"``.

What: each weight of a block's experts module with two or more axes (the fused ``[E, out, in]`` tensors, GPT-OSS's
transposed ones, a per-expert linear's ``[out, in]``) is re-parametrized as ``W + B A``, one ``B [.., out, r]`` and
``A [.., r, in]`` per expert (batched over the leading axes), with ``A`` drawn as a linear layer's default init and
``B`` zero, so training starts from the pruned model exactly (LoRA, Hu et al. 2021). The factors are float32
whatever the model's dtype (their product is formed in the weight's dtype, as PEFT forms it). Biases and routers are
trained as they are (they are small). When training ends the product is folded into the weights
(:func:`torch.nn.utils.parametrize.remove_parametrizations`): the model holds plain tensors of its own shapes again,
so the checkpoint is a stock one and no adapter code is needed to load it.

Why: full distillation keeps a gradient and two AdamW moments per trained weight, three more copies of the routed
experts (87 GB beside a 32 GB student for REAP 50% of Qwen3-30B-A3B in bf16): it does not fit the GPUs people
prune on. Adapters keep ``r x (out + in)`` trainable numbers per expert and matrix (rank 16 at Qwen3-30B-A3B's
shapes: 2.2% of the expert weights, 37.8 GB in all on paper), so memory is the student plus a small state. Each
experts call runs under activation checkpointing, so the effective weights ``W + B A`` of only one layer exist at a
time (recomputed in the backward pass) instead of a second copy of every layer's experts held for the backward pass.

Invariants: weights that are exactly zero before (the zero padding of per-expert widths) are zero after (the
update is masked there, by a mask of a byte per weight kept only for tensors that hold such zeros); on failure the
parametrizations are removed without folding, leaving the weights as they were. PEFT's ``target_parameters`` does the same re-parametrization but cannot keep the padding zero and would
bring PEFT and accelerate as dependencies for what is one torch parametrization here.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from moe_fx.errors import BadOptionError
from moe_fx.model.spec import MoEModelSpec

__all__ = ["LowRankDelta", "adapted_weights", "adapter_parameter_count", "low_rank_adapters"]


class LowRankDelta(nn.Module):
    """The parametrization ``W -> W + B A`` of one weight (see module doc); ``keep`` masks the update where ``W`` was
    exactly zero (padding), or is None where no entry was."""

    def __init__(self, weight: torch.Tensor, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        *lead, out_features, in_features = weight.shape
        rank = min(rank, out_features, in_features)
        bound = 1 / math.sqrt(in_features)  # nn.Linear's default init of a [rank, in] weight (LoRA's A)
        a = torch.rand(*lead, rank, in_features, generator=generator, dtype=torch.float32) * (2 * bound) - bound
        self.a = nn.Parameter(a.to(weight.device))
        self.b = nn.Parameter(torch.zeros(*lead, out_features, rank, dtype=torch.float32, device=weight.device))
        zero = weight == 0
        self.register_buffer("keep", ~zero if bool(zero.any()) else None, persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # in the weight's dtype, fused with the addition where nothing is masked: one tensor the size of the weight
        # (a float32 product first would be twice that again, at every experts call and its recomputation)
        b, a = self.b.to(weight.dtype), self.a.to(weight.dtype)
        if self.keep is None and weight.ndim in (2, 3):
            return (torch.addmm if weight.ndim == 2 else torch.baddbmm)(weight, b, a)
        return weight + torch.matmul(b, a) * self.keep


def adapted_weights(module: nn.Module) -> list[str]:
    """Names of ``module``'s own parameters that take an adapter: floating tensors of two or more axes, not biases."""
    return [name for name, p in module.named_parameters(recurse=False)
            if p.ndim >= 2 and p.is_floating_point() and "bias" not in name]


def _targets(model: nn.Module, spec: MoEModelSpec) -> tuple[list[tuple[nn.Module, str]], list[nn.Parameter]]:
    """``(adapted, direct)``: the (module, weight name) pairs that take an adapter, in the spec's routed experts'
    modules and their submodules (per-expert linears), and the parameters trained as they are (those modules'
    other floating parameters, the biases, and the routers'), each once."""
    adapted, direct = [], []
    for m in dict.fromkeys(m for b in spec.blocks for m in model.get_submodule(b.experts.path).modules()):
        names = adapted_weights(m)
        adapted += [(m, name) for name in names]
        direct += [p for name, p in m.named_parameters(recurse=False) if name not in names and p.is_floating_point()]
    direct += [p for b in spec.blocks for p in model.get_submodule(b.router.path).parameters()]
    return adapted, list(dict.fromkeys(direct))


def adapter_parameter_count(model: nn.Module, spec: MoEModelSpec, rank: int) -> tuple[int, int]:
    """``(factors, direct)``: the numbers adapters of rank ``rank`` train on ``model`` (which may be on the meta device)
    and those trained as they are (biases, routers)."""
    adapted, direct = _targets(model, spec)
    factors = 0
    for m, name in adapted:
        *lead, out_features, in_features = getattr(m, name).shape
        factors += math.prod(lead) * min(rank, out_features, in_features) * (out_features + in_features)
    return factors, sum(p.numel() for p in direct)


@contextlib.contextmanager
def low_rank_adapters(model: nn.Module, spec: MoEModelSpec, rank: int, seed: int = 0) -> Iterator[tuple[list[nn.Parameter], list[nn.Parameter]]]:
    """Adapters of rank ``rank`` on the spec's routed experts while the block runs (see module doc).

    Yields ``(factors, direct)``: the adapters' factors and the parameters trained as they are (experts' biases,
    routers). On a normal exit the updates are folded into the weights; after an exception they are dropped."""
    if rank < 1:
        raise BadOptionError(f"adapters: rank must be >= 1, got {rank}")
    generator = torch.Generator().manual_seed(seed)
    adapted, direct = _targets(model, spec)
    tops = [model.get_submodule(b.experts.path) for b in spec.blocks]
    folded = False
    try:
        for m, name in adapted:
            parametrize.register_parametrization(m, name, LowRankDelta(getattr(m, name), rank, generator))
        for top in tops:
            top.forward = _checkpointed(top.forward)
        factors = [p for m, name in adapted for p in m.parametrizations[name][0].parameters()]
        yield factors, direct
        folded = True
    finally:
        for top in tops:
            vars(top).pop("forward", None)
        for m, name in adapted:
            if parametrize.is_parametrized(m, name):
                parametrize.remove_parametrizations(m, name, leave_parametrized=folded)


def _checkpointed(forward):
    """``forward`` under activation checkpointing, with each adapted weight computed once per call (the eager
    experts loop reads the weight once per expert)."""

    def run(*args, **kwargs):
        with parametrize.cached():
            return forward(*args, **kwargs)

    def call(*args, **kwargs):
        if not torch.is_grad_enabled():
            return run(*args, **kwargs)
        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    return call
