"""Forward math of one block's fused experts, in every stored layout, for passes that need what happens
*inside* an expert (the intermediate activations): compensation refits down projections on them, channel
observers score each intermediate neuron by them.

The experts module is never re-implemented for calibration outputs (see :mod:`moe_fx.calibrate.hooks`);
this reconstruction is for the quantities the module does not expose. The gating is the module's own
(``_apply_gate``: GPT-OSS's clamped GLU included); experts with neither that nor an ``ACT2FN`` activation are
refused (:func:`check_expert_math`).
"""

from __future__ import annotations

import torch
from torch import nn

from moe_fx.errors import UnsupportedFamilyError
from moe_fx.model.expert_weights import NeuronTensor, neuron_tensors
from moe_fx.model.spec import ExpertsSpec
from moe_fx.model.tensors import get_tensor


class ExpertMath:
    """Forward math of one block's fused experts, read through :func:`neuron_tensors` (every stored layout).

    ``activations(e, x)``: ``[N, I]`` intermediate activations of expert ``e``; ``down(e)``: ``D_e^T [I, H]`` and
    ``down_bias(e)``: ``[H]``, in float64; ``set_down(e, DT)`` writes back in the tensor's dtype and layout.

    The gating is the experts module's own (transformers' ``_apply_gate``: SwiGLU on concatenated or interleaved
    halves, GPT-OSS's clamped GLU with ``alpha``/``limit``, ...), fed the per-neuron gate/up projections in the
    layout it reads, so any gating transformers describes is reproduced, not re-implemented. Modules without it
    use the spec's ``ACT2FN`` activation on ``gate * up`` (or on ``up``).
    """

    def __init__(self, model: nn.Module, experts: ExpertsSpec) -> None:
        module = model.get_submodule(experts.path)
        check_expert_math(module, experts)
        self.model, self.spec, self.module = model, experts, module
        tensors, passive = neuron_tensors(model, experts)
        proj = experts.gate_up or experts.up
        by_name = {nt.name: nt for nt in tensors}
        self.proj: NeuronTensor = by_name[proj]
        self.proj_bias: NeuronTensor | None = by_name.get(f"{proj}_bias")
        self.down_nt: NeuronTensor = by_name[experts.down]
        self.down_bias_name = passive[0] if passive else None
        self.parts = 2 if experts.gate_up else 1
        self.act = None if _has_own_gating(module) else _act_fn(experts)

    def pre_activations(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """``[N, I, parts]``: expert ``e``'s gate and up projections of ``x`` (biases included), per neuron."""
        w = self.proj.features(get_tensor(self.model, self.proj.name)[e].detach().to(x))  # [I, parts*H]
        inter = w.shape[0]
        pre = (x @ w.reshape(inter * self.parts, -1).T).view(x.shape[0], inter, self.parts)
        if self.proj_bias is not None:
            pre = pre + self.proj_bias.features(get_tensor(self.model, self.proj_bias.name)[e].detach().to(x))
        return pre

    def routed_pre_activations(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``[N, I, parts]``: like :meth:`pre_activations`, for rows ``x [N, H]`` each routed to expert ``ids[n]``,
        all experts in one batched matmul on the stored tensor (no loop over experts, no copy of the weights)."""
        pre = _routed_product(self.proj, get_tensor(self.model, self.proj.name), x, ids)
        if self.proj_bias is not None:
            pre = pre + self.proj_bias.stacked(get_tensor(self.model, self.proj_bias.name).detach())[ids].to(pre)
        return pre

    def routed_down_input_grad(self, grad: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``[N, I]``: ``D_e^T grad_n`` for output gradients ``grad [N, H]`` of rows routed to expert ``ids[n]``: the
        gradient at the activations entering down (before the routing weight)."""
        return _routed_product(self.down_nt, get_tensor(self.model, self.spec.down), grad, ids)[..., 0]

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """``[N, I]`` intermediate activations from :meth:`pre_activations`: the module's gating of its gate and up
        projections (``act(gate) * up`` for most families), or ``act(up)`` for non-gated experts."""
        if self.act is not None:
            return self.act(pre[..., 0]) if self.parts == 1 else self.act(pre[..., 0]) * pre[..., 1]
        if self.parts == 1:
            return self.module.act_fn(pre[..., 0])
        if getattr(self.module, "is_concatenated", True):  # [gate_0 .. gate_I, up_0 .. up_I]
            fused = torch.cat([pre[..., 0], pre[..., 1]], dim=-1)
        else:  # interleaved: [gate_0, up_0, gate_1, up_1, ...]
            fused = pre.flatten(-2)
        return self.module._apply_gate(fused)

    def activations(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_activations(e, x))

    def down(self, e: int, like: torch.Tensor) -> torch.Tensor:
        return self.down_nt.features(get_tensor(self.model, self.spec.down)[e].detach()).to(like)

    def down_bias(self, e: int, like: torch.Tensor) -> torch.Tensor | None:
        if self.down_bias_name is None:
            return None
        return get_tensor(self.model, self.down_bias_name)[e].detach().to(like)

    @torch.no_grad()
    def set_down(self, e: int, dt: torch.Tensor) -> None:
        t = get_tensor(self.model, self.spec.down)
        t[e].movedim(self.down_nt.axis, 0).copy_(dt.to(t.dtype))

    def output(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """``[N, H]`` unweighted output of expert ``e`` on ``x``."""
        return self.project(e, self.activations(e, x))

    def project(self, e: int, a: torch.Tensor) -> torch.Tensor:
        """``[N, H]`` output of expert ``e`` from its intermediate activations ``a`` (:meth:`activations`)."""
        y = a @ self.down(e, a)
        b = self.down_bias(e, a)
        return y if b is None else y + b


def _has_own_gating(module: nn.Module) -> bool:
    """Whether transformers describes the module's gating (``use_experts_implementation``: ``has_gate`` and
    ``_apply_gate``, or ``act_fn`` for non-gated experts)."""
    if not hasattr(module, "has_gate"):
        return False
    return hasattr(module, "_apply_gate") if module.has_gate else hasattr(module, "act_fn")


def _act_fn(experts: ExpertsSpec):
    from transformers.activations import ACT2FN

    return ACT2FN[experts.activation]


def check_expert_math(module: nn.Module, experts: ExpertsSpec, *, linear_down: bool = False) -> None:
    """Refuse experts whose intermediate activations :class:`ExpertMath` cannot reproduce (no gating transformers
    describes and no ``ACT2FN`` activation) and, with ``linear_down`` (what compensation needs), experts whose output
    is not ``down(activations)`` (a per-expert norm after the down projection). Reads only the module's
    attributes, so it runs on a model whose weights are not loaded (the meta device)."""
    from transformers.activations import ACT2FN

    if linear_down and getattr(module, "has_post_expert_norm", False):
        raise UnsupportedFamilyError(
            f"{experts.path}: {type(module).__name__} normalises each expert's output after its down projection, so its "
            "output is not linear in the down weights; compensation and channel scoring cannot model it"
        )
    if not _has_own_gating(module) and experts.activation not in ACT2FN:
        raise UnsupportedFamilyError(
            f"{experts.path}: {type(module).__name__} has no transformers gating (_apply_gate) and its activation "
            f"{experts.activation!r} is not an ACT2FN name, so its experts' output cannot be reproduced"
        )


def _routed_product(nt: NeuronTensor, t: torch.Tensor, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[N, I, parts]`` float32: row ``x_n`` contracted with expert ``ids[n]``'s slice of ``t`` over its non-neuron
    axis, read per neuron through ``nt`` (computed in the weights' dtype)."""
    w = t.detach()
    out = grouped_matmul(x.to(w.dtype), ids, w, neuron_last=nt.axis == 1).float()
    return nt.by_neuron(out)


def grouped_matmul(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, *, neuron_last: bool) -> torch.Tensor:
    """``[N, M]``: row ``n`` of ``x [N, K]`` times expert ``ids[n]``'s matrix, ``w[e] [K, M]`` (``neuron_last``) or
    ``w[e] [M, K]`` (transposed on the fly). Rows sorted by expert through one ``moe_fx::grouped_mm`` (shapes that
    depend on ``N`` only, so it also runs inside a compiled graph: :mod:`moe_fx.deliver.graph.instrument`); where that
    operator has no kernel, one padded batched matmul (rows grouped by expert into ``[E, max rows, K]``)."""
    from moe_fx.kernels import grouped_mm

    n, e = x.shape[0], w.shape[0]
    if grouped_mm.supported(x.device, w.dtype):
        sorted_ids, order = torch.sort(ids)
        offsets = torch.searchsorted(sorted_ids, torch.arange(e, device=ids.device), right=True).to(torch.int32)
        product = torch.ops.moe_fx.grouped_mm(x[order], w, offsets, neuron_last)
        return torch.empty_like(product).index_copy_(0, order, product)
    order = torch.argsort(ids, stable=True)
    grouped = ids[order]
    counts = torch.bincount(ids, minlength=e)
    rank = torch.arange(n, device=x.device) - (torch.cumsum(counts, 0) - counts)[grouped]
    padded = x.new_zeros(e, int(counts.max()) if n else 0, x.shape[1])
    padded[grouped, rank] = x[order]
    product = torch.bmm(padded, w if neuron_last else w.transpose(1, 2))
    out = x.new_empty(n, product.shape[2])
    out[order] = product[grouped, rank]
    return out
