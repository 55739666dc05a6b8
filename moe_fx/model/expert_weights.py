"""Per-neuron view of an expert's fused tensors, in every layout the spec describes.

An expert's intermediate neuron ``j`` is a row of gate and of up (concatenated ``[gate; up]`` or interleaved
``g0, u0, g1, u1``, stored ``[E, 2I, H]`` or transposed ``[E, H, 2I]``) and a column of down, plus per-neuron
biases. Rewrites that work neuron by neuron (merging aligns neurons; compensation recomputes activations)
read and write expert weights through this one description instead of each decoding layouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_fx.errors import UnsupportedFamilyError
from moe_fx.model.spec import ExpertsSpec
from moe_fx.model.tensors import get_tensor


@dataclass(frozen=True)
class NeuronTensor:
    """A per-expert tensor holding entries of each intermediate neuron.

    ``axis``: the axis of one expert's slice ``t[e]`` that indexes neurons; ``index [I, parts]``: for each
    neuron, its positions along that axis (``parts`` = 2 for a fused gate/up projection: ``(j, I + j)``
    concatenated, ``(2j, 2j + 1)`` interleaved; 1 otherwise).
    """

    name: str
    axis: int
    index: torch.Tensor

    def __post_init__(self) -> None:
        # read once here: inside a compiled graph (moe_fx.deliver.graph.instrument) the index cannot be read or indexed with
        object.__setattr__(self, "_concatenated", self.index.shape[1] == 2 and int(self.index[0, 1]) != 1)

    @property
    def concatenated(self) -> bool:
        """Whether a two-part tensor holds its parts concatenated (``[gate; up]``) rather than interleaved."""
        return bool(self._concatenated)

    def by_neuron(self, t: torch.Tensor) -> torch.Tensor:
        """``[..., I, parts]``: the last axis of ``t`` (this tensor's neuron axis) split into neurons, as views
        (no gather: it runs in a compiled graph, where the index tensor is a constant of the wrong kind)."""
        parts, inter = self.index.shape[1], self.index.shape[0]
        if parts == 1:
            return t.unsqueeze(-1)
        if self._concatenated:
            return t.unflatten(-1, (parts, inter)).transpose(-1, -2)
        return t.unflatten(-1, (inter, parts))

    def features(self, w: torch.Tensor) -> torch.Tensor:
        """``[I, F]``: the entries of each neuron in the expert slice ``w``."""
        x = w.movedim(self.axis, 0)
        return x[self.index].reshape(self.index.shape[0], -1)

    def stacked(self, t: torch.Tensor) -> torch.Tensor:
        """``[E, I, parts, ...]``: the entries of each neuron of every expert of the fused tensor ``t``."""
        return self.by_neuron(t.movedim(self.axis + 1, -1)).movedim((-2, -1), (1, 2))

    def resized(self, width: int) -> NeuronTensor:
        """The same layout for ``width`` neurons (what the tensor becomes when channels are removed)."""
        return NeuronTensor(self.name, self.axis, neuron_index(width, self.index.shape[1], self._concatenated))

    def permuted(self, w: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """``w`` with its neurons reordered: new neuron ``j`` is old neuron ``perm[j]``."""
        order = torch.arange(w.shape[self.axis], device=w.device)
        order[self.index.reshape(-1).to(w.device)] = self.index[perm.cpu()].reshape(-1).to(w.device)
        return w.index_select(self.axis, order)


def _orientation(proj: torch.Size, down: torch.Size, parts: int, hidden: int, declared: bool) -> bool:
    """Whether the experts' 2D slices are stored ``[in, out]`` (transposed) rather than ``[out, in]``.

    Decided by the stored shapes where they can tell: ``[parts*I, H]`` + ``[H, I]`` against
    ``[H, parts*I]`` + ``[I, H]``, then by which side of the input projection is the hidden size; the
    spec's flag only breaks remaining ties. Shapes are trusted over the flag because the flag comes from an
    optional module attribute that some families lack (Llama 4 stores ``[E, H, 2I]`` without it).
    """
    fits = {False: proj[0] == parts * down[1], True: proj[1] == parts * down[0]}
    if fits[False] != fits[True]:
        return fits[True]
    if not fits[False]:
        raise UnsupportedFamilyError(f"expert projections of shapes {tuple(proj)} and {tuple(down)} do not chain")
    if (proj[0] == hidden) != (proj[1] == hidden):
        return proj[0] == hidden
    return declared


def neuron_index(inter: int, parts: int, concatenated: bool) -> torch.Tensor:
    """``[I, parts]``: each neuron's positions along a fused projection of width ``I`` (``(j, I + j)`` for
    concatenated gate/up, ``(2j, 2j + 1)`` interleaved, ``(j,)`` for one part)."""
    j = torch.arange(inter)
    if parts == 1:
        return j[:, None]
    if concatenated:
        return torch.stack([j, j + inter], dim=1)
    return torch.stack([2 * j, 2 * j + 1], dim=1)


def neuron_tensors(model: nn.Module, experts: ExpertsSpec) -> tuple[list[NeuronTensor], list[str]]:
    """The neuron-indexed tensors of a block's experts, and the per-expert tensors that are not (down bias).

    Handles gate/up fused concatenated or interleaved, transposed or not, non-gated ``up`` experts and
    biases. Raises :class:`UnsupportedFamilyError` for any other per-expert tensor or inconsistent shapes.
    """
    proj = experts.gate_up or experts.up
    parts = 2 if experts.gate_up else 1
    w, down = get_tensor(model, proj), get_tensor(model, experts.down)
    if w.ndim != 3 or down.ndim != 3:
        raise UnsupportedFamilyError(
            f"{experts.path}: expected fused [E, out, in] expert tensors, got shapes {tuple(w.shape)} and {tuple(down.shape)}"
        )
    transposed = _orientation(w.shape[1:], down.shape[1:], parts, experts.hidden_size, experts.is_transposed)
    inter = down.shape[1] if transposed else down.shape[2]
    out_width = down.shape[2] if transposed else down.shape[1]
    index = neuron_index(inter, parts, experts.is_concatenated)
    j = torch.arange(inter)
    out = [NeuronTensor(proj, 1 if transposed else 0, index), NeuronTensor(experts.down, 0 if transposed else 1, j[:, None])]
    passive = []
    for name in experts.tensors:
        if name in (proj, experts.down):
            continue
        t = get_tensor(model, name)
        if name == f"{proj}_bias" and t.shape[1:] == (parts * inter,):
            out.append(NeuronTensor(name, 0, index))
        elif name == f"{experts.down}_bias" and t.shape[1:] == (out_width,):
            passive.append(name)
        else:
            raise UnsupportedFamilyError(
                f"{name}: per-expert tensor of shape {tuple(t.shape)} that expert merging does not know how to "
                "align; merging supports gate_up/up and down projections and their biases"
            )
    return out, passive


def rebuilt(t: torch.Tensor, nt: NeuronTensor, kept: list[list[int]], width: int | None) -> torch.Tensor:
    """``t`` with only each expert's ``kept`` neurons: moved to the first positions of a ``width``-neuron tensor
    (zeros after them), or left in place with the others zeroed when ``width`` is None (mask mode)."""
    target = nt if width is None else nt.resized(width)
    shape = list(t.shape)
    shape[nt.axis + 1] = target.index.numel()
    out = t.new_zeros(shape)
    for e, ids in enumerate(kept):
        src = nt.index[ids] if width is None else target.index[: len(ids)]
        out[e].movedim(nt.axis, 0)[src.reshape(-1).to(t.device)] = t[e].movedim(nt.axis, 0)[nt.index[ids].reshape(-1).to(t.device)]
    return out


def neuron_features(model: nn.Module, tensors: list[NeuronTensor], expert: int) -> torch.Tensor:
    """``[I, F]`` float32 per-neuron feature vectors of one expert (gate row, up row, down column, biases)."""
    return torch.cat([nt.features(get_tensor(model, nt.name)[expert].detach().float()) for nt in tensors], dim=1)


@torch.no_grad()
def permute_expert(model: nn.Module, tensors: list[NeuronTensor], expert: int, perm: torch.Tensor) -> None:
    """Reorder one expert's intermediate neurons in place (the expert computes the same function)."""
    for nt in tensors:
        t = get_tensor(model, nt.name)
        t[expert].copy_(nt.permuted(t[expert], perm))
