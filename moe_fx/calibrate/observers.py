"""Observers: what each scoring method needs, accumulated as running sums per MoE block.

An observer declares what it needs from a routing event (the router's full probabilities, the per-slot
expert outputs) and updates its named accumulators. Later methods add observers (channel activations,
gradients, coalitions) without touching the instrumentation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from moe_fx.calibrate import distributed
from moe_fx.model.spec import MoEBlockSpec


@dataclass
class RoutingEvent:
    """One experts call: ``hidden [T,H]``, ``top_k_index/weights [T,k]``, and optional extras."""

    hidden: torch.Tensor
    top_k_index: torch.Tensor
    top_k_weights: torch.Tensor
    expert_out: torch.Tensor | None = None
    """Unweighted output of the routed expert for each (token, slot): ``[T*k, H]``."""
    router_probs: torch.Tensor | None = None
    """Router probabilities over all experts ``[T, E]`` (softmax or sigmoid of the logits)."""
    router_logits: torch.Tensor | None = None
    """Raw router logits ``[T, E]`` (router bias included)."""
    selection_bias: torch.Tensor | None = None
    """The block's ``[E]`` selection bias (e.g. ``e_score_correction_bias``), if any."""
    run_experts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    """``run_experts(hidden [N,H], expert_ids [N,1]) -> [N,H]``: the family's own experts on chosen routes."""
    expert_math: Any = None
    """The block's :class:`~moe_fx.model.expert_math.ExpertMath` (for observers with ``needs_math``)."""


class Observer:
    """Base observer: ``init`` makes zeroed accumulators, ``update`` adds one event."""

    name = "observer"
    needs_outputs = False
    needs_probs = False
    needs_logits = False
    needs_math = False
    """Reads the experts' intermediate activations (``event.expert_math``)."""
    needs_grads = False
    """Calibration runs a backward pass of the summed next-token loss and calls :meth:`update_grads`."""
    needs_other_routes = False
    """Runs experts on routes the model did not take (``event.run_experts``, with the weight outside the expert)."""
    on_host = False
    """Its accumulators live in CPU memory (sampled tokens) rather than beside the model (running sums)."""

    def init(self, block: MoEBlockSpec, device: torch.device) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def update(self, acc: dict[str, torch.Tensor], event: RoutingEvent) -> None:
        raise NotImplementedError

    def update_grads(self, acc: dict[str, torch.Tensor], event: RoutingEvent, grad: torch.Tensor) -> None:
        """With ``needs_grads``: ``grad [T,H]`` is the loss gradient at the experts call's output for ``event``."""

    def reduce(self, acc: dict[str, torch.Tensor], keys: list[str]) -> None:
        """Combine this observer's accumulators ``keys`` across ranks (torch.distributed): running sums add."""
        for key in keys:
            distributed.all_reduce_sum_(acc[key])

    def accumulator_bytes(self, block: MoEBlockSpec) -> int:
        """Bytes of one block's accumulators, counted on the meta device (nothing is allocated)."""
        with torch.device("meta"):
            return sum(t.numel() * t.element_size() for t in self.init(block, torch.device("meta")).values())


def _scatter(acc: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
    acc.index_add_(0, idx.reshape(-1), values.reshape(-1).to(acc.dtype))


class RoutingObserver(Observer):
    """Per expert: routed token count, sum of applied routing weights, router probability mass."""

    name = "routing"
    needs_probs = True

    def init(self, block, device):
        z = lambda: torch.zeros(block.num_experts, dtype=torch.float64, device=device)
        return {"count": z(), "weight_sum": z(), "prob_mass": z(), "tokens": torch.zeros((), dtype=torch.float64, device=device)}

    def update(self, acc, event):
        idx = event.top_k_index
        _scatter(acc["count"], idx, torch.ones_like(idx, dtype=torch.float64))
        _scatter(acc["weight_sum"], idx, event.top_k_weights.detach().double())
        if event.router_probs is not None:
            acc["prob_mass"] += event.router_probs.detach().double().sum(0)
        acc["tokens"] += idx.shape[0]


class ReapObserver(Observer):
    """Per expert: sum over routed tokens of ``w * ||expert output||_2`` (REAP saliency) and of ``||output||``."""

    name = "reap"
    needs_outputs = True

    def init(self, block, device):
        z = lambda: torch.zeros(block.num_experts, dtype=torch.float64, device=device)
        return {"reap_sum": z(), "out_norm_sum": z()}

    def update(self, acc, event):
        norms = event.expert_out.detach().float().norm(dim=-1).double()  # [T*k]
        _scatter(acc["reap_sum"], event.top_k_index, norms * event.top_k_weights.detach().reshape(-1).double())
        _scatter(acc["out_norm_sum"], event.top_k_index, norms)


def _reservoir_slots(acc: dict[str, torch.Tensor], key: str, samples: int, gen: torch.Generator, t: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Reservoir sampling (algorithm R) of ``samples`` tokens over a stream: for the ``t`` tokens of this event,
    the positions ``take`` of those accepted and the reservoir ``slot`` each one overwrites (None if none is).

    ``acc[key]`` counts the tokens seen so far and is advanced by ``t``. One token per slot: when several of
    this event's tokens draw the same slot, the last one drawn wins, as if they had been inserted in turn
    (vectorized: a Python loop over the accepted tokens cost 0.4 s a layer at 65k tokens)."""
    seen = int(acc[key])
    pos = torch.arange(seen, seen + t)
    slot = torch.where(pos < samples, pos, (torch.rand(t, generator=gen, dtype=torch.float64) * (pos + 1)).long())
    accepted = (slot < samples).nonzero().flatten()
    acc[key] += t
    if not len(accepted):
        return None
    last = torch.full((samples,), -1, dtype=torch.long).scatter_reduce_(0, slot[accepted], accepted, "amax")
    filled = (last >= 0).nonzero().flatten()
    return last[filled], filled


class _SampledObserver(Observer):
    """Base of the observers keeping a seeded reservoir sample of tokens per block.

    ``size_option``: the :class:`Calibrate` field giving the sample size (Calibrate builds these observers
    as ``cls(getattr(calibrate, size_option), calibrate.seed)``)."""

    size_option = "samples_per_block"
    device: torch.device | None = None
    """Where the sample is kept while calibrating. None: CPU memory, one sample per block, the part of calibration
    that grows with the model (``samples x E x H`` floats a block for NAEE/SHAPE), checked by
    :func:`moe_fx.calibrate.check_host_memory`. Calibration on a GPU (in memory: every block's samples; streamed: one
    layer's) keeps them there when they fit (:func:`moe_fx.calibrate.keep_samples_on`): no copy to the CPU per batch.
    The passes read them in CPU memory either way (:func:`moe_fx.calibrate.calibration_stats`)."""
    seen_key = "sample_seen"
    shared_keys: tuple[str, ...] = ()
    """Accumulators that are the same on every rank (not per sampled token)."""

    def __init__(self, samples: int = 1024, seed: int = 0) -> None:
        self.samples, self.seed = samples, seed
        self._gens: dict[int, torch.Generator] = {}

    @property
    def on_host(self) -> bool:
        return self.device is None or self.device.type == "cpu"

    def _kept_on(self, device: torch.device) -> torch.device:
        """The device :meth:`init` allocates the sample on (``device`` is the model's; meta when only counted)."""
        return device if device.type == "meta" else (self.device or torch.device("cpu"))

    def _store(self, acc: dict[str, torch.Tensor], slot: torch.Tensor, rows: dict[str, torch.Tensor]) -> None:
        """Write each of ``rows`` (this event's accepted tokens) into its reservoir ``slot``."""
        slot = slot.to(acc[next(iter(rows))].device)
        for key, value in rows.items():
            acc[key][slot] = value.to(acc[key].device, acc[key].dtype)

    def reduce(self, acc, keys):
        """Merge the ranks' reservoirs into one sample, drawn from each in proportion to the tokens it saw."""
        rows = [k for k in keys if k != self.seen_key and k not in self.shared_keys]
        distributed.merge_reservoirs(acc, rows, self.seen_key, self.samples, self.seed)

    def _slots(self, acc: dict[str, torch.Tensor], key: str, t: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        gen = self._gens.setdefault(id(acc), torch.Generator().manual_seed(self.seed))
        return _reservoir_slots(acc, key, self.samples, gen, t)


def _rows(x: torch.Tensor, take: torch.Tensor) -> torch.Tensor:
    return x[take.to(x.device)]


class SampleObserver(_SampledObserver):
    """A seeded uniform sample (reservoir) of calibration tokens per block, with their raw router logits, the
    experts' input ``sample_hidden`` and the output of *every* expert on them: what layer-wise search methods
    (NAEE) need to evaluate any subset of experts offline, and what merging compares experts on. Memory is
    bounded: ``samples x (E + 1) x H`` floats per block."""

    name = "samples"
    needs_logits = True
    needs_other_routes = True
    shared_keys = ("sample_selection_bias",)

    def init(self, block, device):
        with torch.device(self._kept_on(device)):
            return {
                "sample_logits": torch.zeros(self.samples, block.num_experts),
                "sample_expert_out": torch.zeros(self.samples, block.num_experts, block.experts.hidden_size),
                "sample_hidden": torch.zeros(self.samples, block.experts.hidden_size),
                "sample_selection_bias": torch.zeros(block.num_experts),
                "sample_topk_index": torch.zeros(self.samples, block.top_k, dtype=torch.long),
                "sample_topk_weight": torch.zeros(self.samples, block.top_k),
                "sample_seen": torch.zeros((), dtype=torch.long, device="cpu"),  # read on the host every event
            }

    def update(self, acc, event):
        picked = self._slots(acc, "sample_seen", event.hidden.shape[0])
        if picked is None:
            return
        take, slot = picked
        e = acc["sample_logits"].shape[1]
        hidden = _rows(event.hidden, take)
        ids = torch.arange(e, device=hidden.device).repeat(hidden.shape[0]).unsqueeze(-1)
        out = event.run_experts(hidden.repeat_interleave(e, dim=0), ids).float().view(-1, e, hidden.shape[-1])
        self._store(acc, slot, {"sample_logits": _rows(event.router_logits, take), "sample_expert_out": out, "sample_hidden": hidden,
                                "sample_topk_index": _rows(event.top_k_index, take), "sample_topk_weight": _rows(event.top_k_weights, take)})
        if event.selection_bias is not None:
            acc["sample_selection_bias"].copy_(event.selection_bias)


class InputObserver(_SampledObserver):
    """A seeded uniform sample (reservoir) of calibration tokens per block with what a block-local refit needs:
    the experts' input ``input_hidden [N,H]``, the raw router logits ``input_logits [N,E]``, the routing really
    applied (``input_topk_index/weight [N,k]``), the selection bias, and the block's routed output
    ``input_target [N,H]`` = sum over slots of ``w * expert output`` (what :class:`CompensateExperts` matches).
    Memory: ``samples x (2H + E + 2k)`` floats per block, on the CPU."""

    name = "inputs"
    needs_logits = True
    needs_outputs = True
    size_option = "inputs_per_block"
    seen_key = "input_seen"
    shared_keys = ("input_selection_bias",)

    def __init__(self, samples: int = 16384, seed: int = 0) -> None:
        super().__init__(samples, seed)

    def init(self, block, device):
        n, h, e, k = self.samples, block.experts.hidden_size, block.num_experts, block.top_k
        with torch.device(self._kept_on(device)):
            return {
                "input_hidden": torch.zeros(n, h),
                "input_logits": torch.zeros(n, e),
                "input_target": torch.zeros(n, h),
                "input_topk_index": torch.zeros(n, k, dtype=torch.long),
                "input_topk_weight": torch.zeros(n, k),
                "input_selection_bias": torch.zeros(e),
                "input_seen": torch.zeros((), dtype=torch.long, device="cpu"),  # read on the host every event
            }

    def update(self, acc, event):
        t, k = event.top_k_index.shape
        picked = self._slots(acc, "input_seen", t)
        if picked is None:
            return
        take, slot = picked
        y = _rows(event.expert_out.view(t, k, -1), take).float()
        w = _rows(event.top_k_weights, take).float()
        self._store(acc, slot, {"input_hidden": _rows(event.hidden, take), "input_logits": _rows(event.router_logits, take),
                                "input_target": (y * w.to(y.device).unsqueeze(-1)).sum(1), "input_topk_index": _rows(event.top_k_index, take),
                                "input_topk_weight": w})
        if event.selection_bias is not None:
            acc["input_selection_bias"].copy_(event.selection_bias)


def _routes(event: RoutingEvent) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (token, slot) route as rows: the expert input ``[T*k, H]`` (float32) and the expert ids ``[T*k]``."""
    k = event.top_k_index.shape[1]
    return event.hidden.float().repeat_interleave(k, dim=0), event.top_k_index.reshape(-1)


class ChannelObserver(Observer):
    """Per expert and intermediate channel, over the tokens routed to the expert: sums of ``|a|``, ``a^2``,
    ``u^2`` and ``z^2`` (``a``: the activation entering down, ``u``: up projection, ``z``: gate projection before
    the activation; non-gated experts: ``u`` is the projection, ``z`` is 0), the routed-token count, and per
    expert the attribution ``sum_t w_te <y_te, Y_t> / ||Y_t||^2`` (``Y_t``: the routed output of token t), the
    share of each token's routed output that the expert's weighted output carries."""

    name = "channels"
    needs_outputs = True
    needs_math = True

    def init(self, block, device):
        e, i = block.num_experts, block.experts.intermediate_size
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)
        return {"chan_abs_sum": z(e, i), "chan_act_sq": z(e, i), "chan_up_sq": z(e, i), "chan_gate_sq": z(e, i),
                "chan_count": z(e), "expert_attribution": z(e)}

    def update(self, acc, event):
        x, ids = _routes(event)
        pre = event.expert_math.routed_pre_activations(x, ids)
        a = event.expert_math.activate(pre)
        for key, value in (("chan_abs_sum", a.abs()), ("chan_act_sq", a * a), ("chan_up_sq", pre[..., -1] ** 2)):
            acc[key].index_add_(0, ids, value.double())
        if pre.shape[-1] == 2:
            acc["chan_gate_sq"].index_add_(0, ids, (pre[..., 0] ** 2).double())
        _scatter(acc["chan_count"], ids, torch.ones_like(ids, dtype=torch.float64))
        t_all, k = event.top_k_index.shape
        y = event.expert_out.float().view(t_all, k, -1)
        w = event.top_k_weights.float()
        total = (y * w.unsqueeze(-1)).sum(1)
        share = (y * total.unsqueeze(1)).sum(-1) * w / (total * total).sum(-1, keepdim=True).clamp(min=1e-30)
        _scatter(acc["expert_attribution"], event.top_k_index, share.double())


class ChannelGradObserver(Observer):
    """Per expert and channel, from one backward pass of the summed next-token loss: with ``a_tj`` the channel's
    activation and ``g_tj = w_te (D_e^T dL/dy_t)_j`` the loss gradient at it (``dL/dy_t``: gradient at the block's
    routed output, ``w_te``: routing weight), over the tokens routed to the expert: ``sum (a g)^2`` (Fisher
    information of a channel mask, per token) and ``sum g^2`` (the output-space curvature HEAPr multiplies by
    the mean ``a^2``)."""

    name = "channel_grads"
    needs_math = True
    needs_grads = True

    def init(self, block, device):
        e, i = block.num_experts, block.experts.intermediate_size
        return {"chan_fisher": torch.zeros(e, i, dtype=torch.float64, device=device), "chan_grad_sq": torch.zeros(e, i, dtype=torch.float64, device=device)}

    def update(self, acc, event):
        pass  # everything happens in the backward pass

    def update_grads(self, acc, event, grad):
        math = event.expert_math
        x, ids = _routes(event)
        a = math.activate(math.routed_pre_activations(x, ids))
        k = event.top_k_index.shape[1]
        g = math.routed_down_input_grad(grad.float().repeat_interleave(k, dim=0), ids) * event.top_k_weights.float().reshape(-1, 1)
        acc["chan_fisher"].index_add_(0, ids, ((a * g) ** 2).double())
        acc["chan_grad_sq"].index_add_(0, ids, (g * g).double())


OBSERVERS: dict[str, type[Observer]] = {
    o.name: o for o in (RoutingObserver, ReapObserver, SampleObserver, InputObserver, ChannelObserver, ChannelGradObserver)
}
