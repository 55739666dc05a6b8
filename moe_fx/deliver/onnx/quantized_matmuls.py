"""Dense linear layers as onnxruntime's ``com.microsoft.MatMulNBits``: int4 weights, block-wise along the input
features (``--dense-weights int4``).

Why: a batch-1 decode step reads every weight it uses once, so its time follows the bytes read. With the experts
in int4 (``--weights int4``, QMoE) what is left in float is the attention projections, the dense and shared-expert
MLPs and the LM head: for 4 layers of Qwen3-30B-A3B the 622 MB float16 LM head and 38 MB of attention a layer
against 19.5 MB of int4 experts, so the experts' int4 alone can make a step at most 1.26x faster
(``docs/benchmarks/speed.md``). onnxruntime-genai's int4 models quantize these layers the same way.

What: every ``nn.Linear`` of the model (:func:`dense_linears`) except the routers and shared-expert gates (the
routing decisions, a few rows each) and a layer whose input width no block size divides. An LM head tied to the
input embeddings is quantized too: the graph then keeps the float matrix for the embedding lookup (one row a token)
beside the int4 copy the LM head reads whole every step (a quarter of its bytes, a quarter more on disk). Each weight is quantized by
:func:`~.quantized_weights.quantize_blocks` (QMoE's int4 format: symmetric, one scale per block of 128, 64, 32 or
16 inputs of a row, zero point 8, the lower nibble first), which is ``MatMulNBits``' raw layout too.

How: the graph's ``MatMul`` and plain ``Gemm`` nodes whose weight is a constant matrix equal, byte for byte, to one
of those layers' weights (found by content: the exporter names the transposed copies ``val_N``) become
``MatMulNBits`` nodes (:func:`lower_dense_matmuls`); the parity check runs the PyTorch model with the same dequantized weights
(:func:`dequantized_linears`), so it checks the graph at the float tolerance, and the difference to the float model
is recorded apart, as for QMoE.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from moe_fx.deliver.onnx.fused_experts import register_constant
from moe_fx.deliver.onnx.quantized_weights import BLOCK_SIZES, dequantize_blocks, quantize_blocks
from moe_fx.model.trace import trace

DENSE_FORMATS = ("float", "int4")
"""``--dense-weights``: the dense linear layers' weights in the graph's dtype or as int4 ``MatMulNBits``."""
DOMAIN, OP = "com.microsoft", "MatMulNBits"


@dataclass(frozen=True)
class QuantizedLinear:
    """One linear layer's weight ``[N, K]`` in ``MatMulNBits``' int4 format: ``packed`` ``uint8 [N, K / block,
    block / 2]``, ``scales`` ``[N, K / block]`` in the graph's dtype."""

    packed: np.ndarray
    scales: torch.Tensor
    block_size: int

    @property
    def shape(self) -> tuple[int, int]:
        rows, blocks, half = self.packed.shape
        return rows, blocks * half * 2

    def dequantized(self) -> torch.Tensor:
        """The float32 ``[N, K]`` weight the node computes with (its scales as the graph stores them)."""
        rows, k = self.shape
        flat = self.packed.reshape(1, rows, k // 2)
        return torch.from_numpy(dequantize_blocks(flat, self.scales.float().numpy()[None], "int4", self.block_size, k)[0])


def _block_size(k: int) -> int:
    return next((b for b in BLOCK_SIZES if k % b == 0), 0)


def dense_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The model's linear layers that ``--dense-weights int4`` quantizes, by module path (module doc)."""
    spec = trace(model)
    routing = {b.router.path for b in spec.blocks} | {s.gate_path for b in spec.blocks for s in b.shared if s.gate_path}
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name not in routing and _block_size(module.in_features)}


def quantize_linears(linears: dict[str, nn.Linear]) -> dict[str, QuantizedLinear]:
    """Each layer's weight in int4, its scales rounded to the layer's dtype (what the graph stores)."""
    out = {}
    for name, module in linears.items():
        weight = module.weight.detach()
        block = _block_size(weight.shape[1])
        packed, scales = quantize_blocks(weight.float().cpu().numpy()[None], "int4", block)
        rows, k = weight.shape
        out[name] = QuantizedLinear(packed[0].reshape(rows, k // block, block // 2), torch.from_numpy(scales[0]).to(weight.dtype), block)
    return out


def _fingerprint(data: bytes, shape: tuple[int, ...]) -> tuple[tuple[int, ...], str]:
    return shape, hashlib.blake2b(data, digest_size=16).hexdigest()


def _weight_of(node) -> tuple[object, bool] | None:
    """The constant weight operand of a ``MatMul`` (``[K, N]``, or the ``Transpose`` of an ``[N, K]`` constant: a tied
    LM head reading the embedding matrix) or of a plain ``Gemm`` (``A @ B`` or ``A @ B^T``, plus a bias), and whether
    it is stored ``[N, K]`` (the layer's own orientation); ``None`` for other nodes."""
    if node.domain != "" or node.op_type not in ("MatMul", "Gemm"):
        return None
    weight, rows_first = node.inputs[1], False
    source = weight.producer() if weight is not None else None
    if node.op_type == "MatMul" and source is not None and source.op_type == "Transpose" and list(source.attributes["perm"].value) == [1, 0]:
        weight, rows_first = source.inputs[0], True
    if weight is None or weight.const_value is None or len(weight.shape) != 2:
        return None
    if node.op_type == "MatMul":
        return weight, rows_first
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return None
    return weight, bool(attrs.get("transB", 0))


def lower_dense_matmuls(graph, linears: dict[str, nn.Linear], quantized: dict[str, QuantizedLinear]) -> list[str]:
    """Rewrite each ``MatMul`` (or plain ``Gemm``: the exporter's form for 2-D inputs, its bias then an ``Add``) whose
    constant weight is, byte for byte, one of ``linears``' weights into ``MatMulNBits`` with its ``quantized`` form;
    return the layers rewritten (layers of equal weights, which the graph may hold once, all count). Constants no
    longer read leave the graph."""
    import onnx_ir as ir

    by_content: dict[tuple, tuple[list[str], bool]] = {}
    for name, module in linears.items():
        weight = module.weight.detach().cpu()
        for rows_first, stored in ((True, weight.contiguous()), (False, weight.t().contiguous())):
            key = _fingerprint(stored.view(torch.uint8).numpy().tobytes(), tuple(stored.shape))
            by_content.setdefault(key, ([], rows_first))[0].append(name)
    rewritten, seen = [], {}
    for node in list(graph.all_nodes()):
        operand = _weight_of(node)
        if operand is None:
            continue
        weight, rows_first = operand
        if weight.name not in seen:
            seen[weight.name] = by_content.get(_fingerprint(weight.const_value.tobytes(), tuple(weight.shape)))
        if seen[weight.name] is None or seen[weight.name][1] != rows_first:
            continue
        names = seen[weight.name][0]
        name = names[0]
        q = quantized[name]
        rows, k = q.shape
        consts = [graph.initializers[key] if key in graph.initializers else register_constant(graph, key, array)
                  for key, array in ((f"{name}.weight.q4", q.packed), (f"{name}.weight.scales", q.scales.reshape(-1)))]
        nodes = [ir.node(OP, inputs=[node.inputs[0], *consts], domain=DOMAIN, name=f"{node.name}_nbits",
                         attributes={"K": k, "N": rows, "bits": 4, "block_size": q.block_size})]
        if len(node.inputs) > 2 and node.inputs[2] is not None:  # a Gemm's bias
            nodes.append(ir.node("Add", inputs=[nodes[0].outputs[0], node.inputs[2]], name=f"{node.name}_bias"))
        out, new = node.outputs[0], nodes[-1].outputs[0]
        for made in nodes:
            graph.insert_before(node, made)
            made.outputs[0].shape, made.outputs[0].dtype = out.shape, out.dtype
        out.replace_all_uses_with(new, replace_graph_outputs=True)
        transpose = node.inputs[1].producer()
        graph.remove(node, safe=True)
        if transpose is not None and not transpose.outputs[0].uses():  # a tied LM head's Transpose of the embedding matrix
            graph.remove(transpose, safe=True)
        new.name = out.name
        rewritten += [n for n in names if n not in rewritten]
    for value_name in [n for n, v in graph.initializers.items() if n in seen and not v.uses() and not v.is_graph_output()]:
        graph.initializers.pop(value_name)
    return rewritten


@contextlib.contextmanager
def dequantized_linears(model: nn.Module, quantized: dict[str, QuantizedLinear]) -> Iterator[None]:
    """The layers' weights replaced by what ``MatMulNBits`` computes with, restored on exit. Each layer gets a
    parameter of its own, so that an embedding tied to the LM head keeps its float rows, as in the graph."""
    saved = []
    try:
        for name, q in quantized.items():
            module = model.get_submodule(name)
            saved.append((module, module.weight))
            module.weight = nn.Parameter(q.dequantized().to(module.weight.dtype).to(module.weight.device), requires_grad=False)
        yield
    finally:
        for module, weight in saved:
            module.weight = weight
