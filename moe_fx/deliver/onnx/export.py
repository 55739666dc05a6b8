"""ONNX export of a (pruned) MoE causal LM, with KV cache, in the layout Optimum's decoder exports use.

The graph comes from transformers' own ONNX exporter (``transformers.exporters``: ``torch.export`` then
``torch.onnx.export(dynamo=True)`` with its fixes for onnxruntime), dynamic in batch, sequence and past length.
Each block's routed experts become one onnxruntime ``com.microsoft.MoE`` node (``QMoE`` with int8/int4
weights) where the operator computes the family's experts (:mod:`.fused_experts`), else the plain-op path
of the ``moe_fx`` experts implementation (:mod:`moe_fx.kernels.distinct_forward`); the record says which. moe-fx then gives
it Optimum's interface (``past_key_values.{i}.key|value`` -> ``present.{i}.key|value``, named dims), folds
per-layer constants that the cache object carries (sliding-window sizes) into the graph, strips the
stack-trace metadata, checks it in onnxruntime against PyTorch, and writes the directory atomically with
the config, generation config and tokenizer, so ``ORTModelForCausalLM.from_pretrained(dir)`` loads it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from moe_fx.deliver.onnx.fused_attention import ATTENTIONS, AttentionPlan, group_query_attention
from moe_fx.deliver.onnx.fused_experts import (
    FusedLayout,
    dequantized_weights,
    fused_export,
    lower_fused_experts,
    plan_fusion,
    route_in_operator,
)
from moe_fx.deliver.onnx.quantized_matmuls import DENSE_FORMATS, dense_linears, dequantized_linears, lower_dense_matmuls, quantize_linears
from moe_fx.deliver.onnx.quantized_weights import WEIGHT_FORMATS
from moe_fx.deliver.onnx.real_rotary import real_rotary
from moe_fx.deliver.onnx.runtime import ONNX_FILE, OnnxCausalLM, Parity, check_parity
from moe_fx.deliver.onnx.static_decode import STATIC_INPUTS, StaticShape, fold_token_counts, scatter_updates, static_sample_inputs
from moe_fx.environment import versions
from moe_fx.errors import BadOptionError, MoeFxError, first_line
from moe_fx.evaluate.nll import model_size
from moe_fx.formats.atomic import atomic_directory
from moe_fx.formats.checkpoint import CONFIG_FILES, RECORD_FILE, TOKENIZER_FILES, check_output_path, copy_files, patch_config, write_config
from moe_fx.formats.loading import load_model, parse_dtype
from moe_fx.kernels import experts_module as layout
from moe_fx.kernels.implementation import DEFAULT_IMPLEMENTATION, experts_implementation
from moe_fx.model.trace import trace

MOE_OPS = ("fused", "unfused")
"""``--moe-op``: routed experts as onnxruntime's MoE node per block, or as plain ONNX ops."""
ORT_FUSIONS = ("cpu", "cuda")
"""``--ort-fusions``: the provider transformers' onnxruntime fusions target."""

EXTERNAL_DATA_FILE = "model.onnx_data"
"""Weights go here (Optimum's name) when the graph would pass protobuf's 2 GB limit."""

PROTOBUF_LIMIT = 2_000_000_000

MIN_OPSET, MAX_OPSET = 18, 24
"""Opsets the dynamo exporter writes and onnxruntime (1.2x) loads for these graphs; 25+ trips ORT on ``Attention``."""

ATTENTION_OPSET = 23
"""From this opset on, attention exports as ONNX's ``Attention`` op, which takes fewer key/value heads than query
heads; the trace then keeps transformers' SDPA on its grouped-query form (:func:`_grouped_kv_attention`)."""
_SDPA_GQA_SWITCH = "TRANSFORMERS_SDPA_FORCE_GQA"

FP32_LOGIT_TOLERANCE = 1e-4
"""Absolute logit difference an fp32 export may show against PyTorch (the issue's bar)."""

HALF_LOGIT_TOLERANCE = 2e-2
"""Relative to the largest logit, for float16/bfloat16 exports (rounding of the half-precision ops)."""

_PAST_INPUT = re.compile(r"^(?:input\.)?past_key_values\.layers\.(\d+)\.(\w+)$")
"""The cache object's tensors among the exporter's graph inputs: ``input.past_key_values.layers.{i}.{attr}``
(transformers 5.23) or ``past_key_values.layers.{i}.{attr}`` (5.24 and later)."""
_PAST_OUTPUT = re.compile(r"^(?:output\.past_key_values|cache)\.layers\.(\d+)\.(\w+)$")
"""The same among its outputs: ``output.past_key_values.layers.{i}.{attr}`` (5.23) or ``cache.layers.{i}.{attr}`` (5.24+)."""
_CACHE_KIND = {"keys": "key", "values": "value"}
_OPTIMUM_PAST = re.compile(r"^(past_key_values|present)\.\d+\.(key|value)$")
"""Optimum's names for the cache inputs and outputs, which moe-fx gives them."""


class OnnxParityError(MoeFxError):
    """The exported graph does not reproduce the PyTorch model within tolerance (nothing is written)."""


@dataclass
class OnnxExport:
    """What an export wrote and measured."""

    path: Path
    with_past: bool
    dtype: str
    inputs: list[str]
    outputs: list[str]
    initializer_bytes: int
    parameter_bytes: int
    onnx_bytes: int
    export_seconds: float
    parity: Parity | None = None
    folded_constants: dict[str, int] = field(default_factory=dict)
    weights: str = "float"
    fused_blocks: list[str] = field(default_factory=list)
    """Blocks whose experts are one ``com.microsoft.MoE``/``QMoE`` node."""
    unfused_blocks: dict[str, str] = field(default_factory=dict)
    """Blocks left on the plain-op path, with the reason."""
    routed_in_operator: list[str] = field(default_factory=list)
    """Fused blocks whose node takes the router's raw logits and routes itself (softmax, top-k, renormalization):
    the model's routing ops are not in the graph (:func:`~.fused_experts.route_in_operator`)."""
    ort_fusions: str | None = None
    opset: int | None = None
    """The ONNX opset the graph was written in (23+: attention as ONNX's ``Attention`` op)."""
    static: StaticShape | None = None
    """A static decode graph's batch and cache length (:mod:`.static_decode`); ``None``: the dynamic Optimum layout."""
    quantization: Parity | None = None
    """int8/int4 weights (experts or dense layers): the graph against the unquantized model (``parity`` is against the
    dequantized one)."""
    dense_weights: str = "float"
    dense_quantized: list[str] = field(default_factory=list)
    """``--dense-weights int4``: the linear layers that are ``com.microsoft.MatMulNBits`` nodes (:mod:`.quantized_matmuls`)."""
    fused_attention: list[int] = field(default_factory=list)
    """Layers whose attention and cache update are one ``com.microsoft.GroupQueryAttention`` node (static graphs)."""
    unfused_attention: dict[int, str] = field(default_factory=dict)
    """Layers of a static graph left on the model's own attention ops, with the reason."""
    rotary_in_node: list[int] = field(default_factory=list)
    """Fused layers whose node also rotates q and k (the rotary ops and the position input leave the graph)."""
    norms_in_node: list[int] = field(default_factory=list)
    """Fused layers whose node also applies the per-head q/k norms (``--attention gqa-cuda``: a CUDA-only graph)."""

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("path", "parity", "quantization", "static")}
        out["static"] = self.static.to_dict() if self.static is not None else None
        out["parity"] = self.parity.to_dict() if self.parity is not None else None
        out["quantization"] = self.quantization.to_dict() if self.quantization is not None else None
        return out


def _require_onnx_stack() -> None:
    missing = []
    for module in ("onnx", "onnxscript", "onnx_ir", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise MoeFxError(f"ONNX export needs {', '.join(missing)}: pip install 'moe-fx[onnx]' (or 'moe-fx[onnx-gpu]')")
    try:
        from transformers.exporters import OnnxExporter  # noqa: F401
    except ImportError:
        import transformers

        raise MoeFxError(f"ONNX export uses transformers.exporters, which transformers {transformers.__version__} does not have; "
                         "pip install -U 'transformers>=5.23'") from None


def _check_opset(opset: int | None) -> None:
    if opset is None:
        return
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise BadOptionError(f"--opset {opset} is not supported: use {MIN_OPSET} to {MAX_OPSET} (what torch's dynamo exporter "
                             "writes and onnxruntime runs for these graphs)")


def _check_moe_options(moe_op: str | None, weights: str, dtype: str, check: bool, device: str, ort_fusions: str | None,
                       dense_weights: str) -> None:
    """Refuse inconsistent fused-MoE options before any model is loaded."""
    if ort_fusions is not None and ort_fusions not in ORT_FUSIONS:
        raise BadOptionError(f"--ort-fusions {ort_fusions!r} is not one of {', '.join(ORT_FUSIONS)}")
    if moe_op is not None and moe_op not in MOE_OPS:
        raise BadOptionError(f"--moe-op {moe_op!r} is not one of {', '.join(MOE_OPS)}")
    if weights not in WEIGHT_FORMATS:
        raise BadOptionError(f"--weights {weights!r} is not one of {', '.join(WEIGHT_FORMATS)}")
    if dense_weights not in DENSE_FORMATS:
        raise BadOptionError(f"--dense-weights {dense_weights!r} is not one of {', '.join(DENSE_FORMATS)}")
    if weights != "float" and moe_op == "unfused":
        raise BadOptionError(f"--weights {weights} quantizes the fused MoE node (onnxruntime's QMoE): drop --moe-op unfused")
    if moe_op == "fused" and weights == "float" and check and device == "cpu" and parse_dtype(dtype) != torch.float32:
        raise BadOptionError(f"onnxruntime's CPU MoE kernel runs float32 only, so a fused {dtype} graph cannot be checked here: "
                             "export --dtype float32, check on a CUDA device, pass --no-check, or --moe-op unfused")


def _fusion_plan(model: nn.Module, moe_op: str | None, weights: str, dtype: torch.dtype, check_on_cpu: bool,
                 operator_routing: bool = True) -> dict[str, FusedLayout | str]:
    """Which blocks get the fused node (``FusedLayout``) and why the others do not (a reason)."""
    if moe_op == "unfused":
        return {}
    try:
        spec = trace(model)
    except MoeFxError as exc:
        if moe_op == "fused" or weights != "float":
            raise BadOptionError(f"--moe-op fused needs routed experts moe-fx can read: {first_line(exc)}") from None
        return {}
    if moe_op is None and weights == "float" and check_on_cpu and dtype != torch.float32:
        return {b.path: "onnxruntime's CPU MoE kernel runs float32 only (the parity check runs on the CPU)" for b in spec.blocks}
    plan = plan_fusion(model, spec)
    if operator_routing:
        plan = route_in_operator(model, spec, plan, quantized=weights != "float")
    if (moe_op == "fused" or weights != "float") and not any(isinstance(v, FusedLayout) for v in plan.values()):
        raise BadOptionError(f"no block of {type(model).__name__} maps onto onnxruntime's MoE operator ({next(iter(plan.values()))}): "
                             "export with --moe-op unfused")
    return plan


def _check_static_options(static: StaticShape | None, with_past: bool, attention: str | None, check_on_cpu: bool) -> None:
    if attention is not None and attention not in ATTENTIONS:
        raise BadOptionError(f"--attention {attention!r} is not one of {', '.join(ATTENTIONS)}")
    if static is None:
        if attention not in (None, "plain"):
            raise BadOptionError(f"--attention {attention} fuses a --static-cache graph's attention; the dynamic graph's goes through --ort-fusions")
        return
    if attention == "gqa-cuda" and check_on_cpu:
        raise BadOptionError("--attention gqa-cuda puts per-head q/k norms in the attention node, which only onnxruntime's CUDA kernel "
                             "runs, so the parity check cannot run on the CPU: check on --device cuda, pass --no-check, or use --attention gqa")
    if not with_past:
        raise BadOptionError("--static-cache exports a decode graph over a KV cache: drop --no-past")


@contextlib.contextmanager
def _grouped_kv_attention(opset: int | None) -> Iterator[None]:
    """While tracing at ``opset >= 23``: transformers' SDPA passes the cache's key/value heads as they are
    (``enable_gqa``) instead of repeating them to the query heads (``repeat_kv``: a copy of the whole cache per
    layer and step), so the ``Attention`` node reads the cache itself. transformers reads the switch at each call."""
    switch = {_SDPA_GQA_SWITCH: "1"} if opset is not None and opset >= ATTENTION_OPSET else {}
    with mock.patch.dict(os.environ, switch):  # restores the environment as it was on exit
        yield


@contextlib.contextmanager
def _dequantized(model: nn.Module, fused: list[FusedLayout], weights: str) -> Iterator[None]:
    """The fused blocks' expert weights replaced by what the int8/int4 node computes with, restored on exit."""
    saved = []
    try:
        for how in fused:
            experts = model.get_submodule(how.experts)
            for name, value in dequantized_weights(experts, weights).items():
                param = getattr(experts, name)
                saved.append((param, param.data))
                param.data = value.to(param.device)
        yield
    finally:
        for param, data in saved:
            param.data = data


def _sample_inputs(model: nn.Module, with_past: bool, *, batch: int = 2, past_len: int = 5, new_len: int = 3) -> dict:
    """Example inputs to trace with; every size differs from the others so no two axes get unified."""
    vocab = model.get_output_embeddings().weight.shape[0]
    device = next(model.parameters()).device
    ids = torch.randint(3, min(vocab, 32000), (batch, past_len + new_len), generator=torch.Generator().manual_seed(0)).to(device)
    if not with_past:
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(ids.shape[1], device=device).expand(batch, -1),
                "use_cache": False}
    past = model(ids[:, :past_len], use_cache=True).past_key_values
    return {
        "input_ids": ids[:, past_len:],
        "attention_mask": torch.ones_like(ids),
        "position_ids": torch.arange(past_len, past_len + new_len, device=device).expand(batch, -1),
        "past_key_values": past,
        "use_cache": True,
    }


def _cache_constants(cache) -> dict[tuple[int, str], torch.Tensor]:
    """Per-layer scalar tensors a cache object carries besides keys and values (a sliding window's size):
    they ride along as graph inputs and outputs, but are configuration, so they become constants."""
    out = {}
    for i, layer in enumerate(getattr(cache, "layers", [])):
        for name, value in vars(layer).items():
            if isinstance(value, torch.Tensor) and value.dim() == 0 and name not in _CACHE_KIND:
                out[(i, name)] = value.detach().cpu()
    return out


def _cache_values(values, pattern: re.Pattern) -> list[tuple[object, int, str]]:
    """The graph inputs/outputs that carry the cache object's tensors, with their layer and attribute name."""
    out = []
    for value in values:
        m = pattern.match(value.name or "")
        if m:
            out.append((value, int(m.group(1)), m.group(2)))
    return out


def _to_optimum_interface(graph, constants: dict[tuple[int, str], torch.Tensor], static: bool) -> dict[str, int]:
    """Rename the cache inputs/outputs to Optimum's names, fold cache constants, and name the dynamic dims (a static
    graph's token counts are fed from ``cache_position`` instead, and it has no dynamic dims)."""
    import onnx_ir as ir

    if static:
        fold_token_counts(graph)
    folded = {}
    for value, layer, kind in _cache_values(graph.inputs, _PAST_INPUT):
        if kind in _CACHE_KIND:
            value.name = f"past_key_values.{layer}.{_CACHE_KIND[kind]}"
            continue
        if (layer, kind) not in constants:
            raise MoeFxError(f"the exported graph takes cache input {value.name!r}, which moe-fx does not know how to feed; "
                             "please report the model family")
        graph.inputs.remove(value)
        value.const_value = ir.tensor(constants[(layer, kind)].numpy(), name=value.name)
        graph.register_initializer(value)
        folded[f"layers.{layer}.{kind}"] = int(constants[(layer, kind)])
    for value, layer, kind in _cache_values(graph.outputs, _PAST_OUTPUT):
        if kind in _CACHE_KIND:
            value.name = f"present.{layer}.{_CACHE_KIND[kind]}"
        else:
            graph.outputs.remove(value)
    _check_interface(graph, static)
    if not static:
        _name_dims(graph)
    return folded


def _check_interface(graph, static: bool) -> None:
    """Every input and output has one of Optimum's decoder names after the renaming: a transformers release that
    names the cache differently fails here, naming the value, instead of at inference time."""
    import transformers

    expected = {*STATIC_INPUTS, "logits"} if static else {"input_ids", "attention_mask", "position_ids", "logits"}
    odd = [v.name for v in [*graph.inputs, *graph.outputs] if v.name not in expected and not _OPTIMUM_PAST.match(v.name or "")]
    if odd:
        raise MoeFxError(f"transformers {transformers.__version__}'s ONNX exporter named graph values {odd[:3]}, which moe-fx does not map to "
                         "Optimum's decoder layout; please report it with your transformers version")


def _name_dims(graph) -> None:
    """Give the dynamic axes Optimum's names instead of torch.export's symbols (s44, s70 + s36...)."""
    import onnx_ir as ir

    def rename(value, names: dict[int, str]) -> None:
        dims = list(value.shape)
        for axis, name in names.items():
            dims[axis] = name
        # static axes torch.export left symbolic (heads, head size) become their sizes
        value.shape = ir.Shape([int(d.value) if isinstance(d, ir.SymbolicDim) and str(d.value).isdigit() else d for d in dims])

    io = {v.name: v for v in [*graph.inputs, *graph.outputs]}
    with_past = any(n.startswith("past_key_values.") for n in io)
    total = "total_sequence_length" if with_past else "sequence_length"
    for name, value in io.items():
        if name in ("input_ids", "position_ids"):
            rename(value, {0: "batch_size", 1: "sequence_length"})
        elif name == "attention_mask":
            rename(value, {0: "batch_size", 1: total})
        elif name == "logits":
            rename(value, {0: "batch_size", 1: "sequence_length"})
        elif _OPTIMUM_PAST.match(name):
            rename(value, {0: "batch_size", 2: "past_sequence_length" if name.startswith("past_key_values.") else total})


def _share_transposed_copies(graph) -> None:
    """Store a weight once when the graph holds it twice, once transposed (tied input and output embeddings:
    the optimizer folds ``Transpose(embedding)`` into a second initializer). The copy becomes a ``Transpose``
    node reading the original."""
    import onnx_ir as ir

    matrices = [v for v in graph.initializers.values() if v.const_value is not None and len(v.shape) == 2 and not v.is_graph_output()]
    by_shape: dict[tuple, list] = {}
    for v in matrices:
        by_shape.setdefault((tuple(v.shape), v.dtype), []).append(v)
    for (shape, dtype), copies in by_shape.items():
        if shape[0] == shape[1] or shape[0] > shape[1]:
            continue  # look from the wider orientation's side once; square weights are left alone
        for original in by_shape.get(((shape[1], shape[0]), dtype), []):
            array = original.const_value.numpy()
            for copy in copies:
                if copy.const_value is None or not (copy.const_value.numpy() == array.T).all():
                    continue
                node = ir.node("Transpose", inputs=[original], attributes={"perm": [1, 0]}, name=f"{copy.name}_shared")
                graph.insert_before(graph.node(0), node)
                node.outputs[0].name, node.outputs[0].shape, node.outputs[0].dtype = f"{copy.name}_t", copy.shape, copy.dtype
                copy.replace_all_uses_with(node.outputs[0])
                graph.initializers.pop(copy.name)
                copy.const_value = None


def _drop_unused_inputs(graph) -> None:
    """Remove the ``attention_mask`` and ``position_ids`` inputs when nothing reads them (every layer's attention is
    the fused node, which takes no padding mask, and rotates at the slot it writes): a runner then knows the graph's
    rows must hold the same number of tokens, each at the position of its slot."""
    for value in [v for v in graph.inputs if v.name in ("attention_mask", "position_ids") and not v.uses()]:
        graph.inputs.remove(value)


def _strip_metadata(model) -> None:
    """Drop the per-node stack traces and FX names torch.onnx records (they are large and leak local paths)."""
    for graph in model.graphs():
        for node in graph:
            node.metadata_props.clear()


def _initializer_bytes(model) -> int:
    return sum(v.const_value.nbytes for g in model.graphs() for v in g.initializers.values() if v.const_value is not None)


def _explicit_dtype(name: str) -> torch.dtype:
    dtype = parse_dtype(name)
    if dtype == "auto":
        raise BadOptionError("an in-memory model exports in an explicit dtype: float32, float16 or bfloat16")
    return dtype


def _tolerance(dtype: torch.dtype, parity: Parity) -> float:
    return FP32_LOGIT_TOLERANCE if dtype == torch.float32 else HALF_LOGIT_TOLERANCE * max(1.0, parity.logit_scale)


def export_onnx(
    model: nn.Module | str | Path,
    out: str | Path,
    *,
    with_past: bool = True,
    dtype: str = "float32",
    opset: int | None = None,
    check: bool = True,
    device: str = "cpu",
    overwrite: bool = False,
    source: str | Path | None = None,
    moe_op: str | None = None,
    weights: str = "float",
    ort_fusions: str | None = None,
    static: StaticShape | None = None,
    operator_routing: bool = True,
    attention: str | None = None,
    dense_weights: str = "float",
) -> OnnxExport:
    """Export ``model`` (a loaded model or a checkpoint directory, pruned or not) to ``out``; return what was written.

    ``check`` runs the exported graph in onnxruntime against the PyTorch model (logits with and through the
    past, and greedy generation); a graph that misses the tolerance raises :class:`OnnxParityError` and
    leaves no output. ``dtype`` is the precision of the graph (float32 is the one onnxruntime's CPU kernels
    cover fully); an in-memory model is cast to it in place (a directory is loaded in it), and its experts
    implementation is restored afterwards.

    ``moe_op``: ``"fused"`` (each block's experts one onnxruntime MoE node; blocks the operator cannot express
    stay on plain ops, recorded), ``"unfused"`` (plain ops), or ``None``: fused where onnxruntime has a kernel
    for the graph's dtype on the device the check runs on. ``weights``: ``"int8"``/``"int4"`` quantize the fused
    nodes' experts (``QMoE``); parity is then checked against the model with those weights dequantized (the
    fp32 tolerance), and the difference to the unquantized model is recorded in ``quantization``.
    ``ort_fusions`` (``"cpu"``/``"cuda"``): transformers' onnxruntime fusions for that provider (attention,
    rotary embeddings, norms into onnxruntime's own ops), applied after the MoE nodes are in place.
    ``static``: a one-token decode graph of that batch and cache length, with no shape computations, which
    onnxruntime can replay as a CUDA graph (:mod:`.static_decode`); the parity check steps it token by token.
    ``operator_routing``: fused nodes of softmax -> top-k routers take the raw router logits and route
    themselves, the model's routing ops left out (:func:`~.fused_experts.route_in_operator`); ``False`` keeps
    the model's routing in the graph for every block (``--model-routing``).
    ``attention`` (static graphs): ``"gqa"`` makes each layer's attention and cache update one onnxruntime
    ``GroupQueryAttention`` node where the node expresses it (:mod:`.fused_attention`; the others recorded),
    ``"plain"`` keeps the model's ops; ``None``: ``"gqa"`` for float16/bfloat16 graphs (what the node's CUDA
    kernel runs), plain for float32 ones.
    ``dense_weights``: ``"int4"`` makes the dense linear layers (attention projections, dense and shared MLPs, the
    LM head, tied or not; not the routers) onnxruntime ``MatMulNBits`` nodes of int4 weights (:mod:`.quantized_matmuls`),
    checked against the dequantized model like ``weights``.
    """
    _require_onnx_stack()
    _check_opset(opset)
    _check_moe_options(moe_op, weights, dtype, check, device, ort_fusions, dense_weights)
    _check_static_options(static, with_past, attention, check and device == "cpu")
    from transformers.exporters import OnnxConfig, OnnxExporter

    if check and device == "cpu" and parse_dtype(dtype) == torch.bfloat16:
        raise BadOptionError("onnxruntime's CPU kernels do not run bfloat16 graphs, so the parity check cannot run: "
                             "export --dtype float16 or float32, or pass --no-check (or check on a CUDA device)")
    if isinstance(model, (str, Path)):
        source = Path(model)
        model = load_model(model, dtype=dtype, device=device, quantize=None, ragged=False)  # dense, padded experts: the graph holds its own weights
    else:
        quantized = sorted({q for m in model.modules() if (q := layout.quantization(m))})
        if quantized:
            raise BadOptionError(f"the model's experts are quantized in memory ({', '.join(quantized)}); export the checkpoint "
                                 "(its experts load dense) and pass --weights int8|int4 for integer experts in the graph")
        model = model.to(dtype=_explicit_dtype(dtype))
    if not hasattr(model, "generate") or model.get_output_embeddings() is None:
        raise BadOptionError(f"{type(model).__name__} is not a causal LM with an LM head; ONNX export writes decoder graphs")
    out = check_output_path(out, source, overwrite)
    torch_dtype = next(model.parameters()).dtype
    plan = _fusion_plan(model, moe_op, weights, torch_dtype, check and device == "cpu", operator_routing)
    fused = [how for how in plan.values() if isinstance(how, FusedLayout)]
    linears = dense_linears(model) if dense_weights != "float" else {}
    if dense_weights != "float" and not linears:
        raise BadOptionError(f"--dense-weights {dense_weights}: {type(model).__name__} has no linear layer to quantize (routers stay float)")
    quantized_dense = quantize_linears(linears)

    import onnx_ir as ir

    started = time.perf_counter()
    with experts_implementation(model, DEFAULT_IMPLEMENTATION), torch.no_grad():  # the trace and the check
        with scatter_updates() if static is not None else contextlib.nullcontext():
            inputs = static_sample_inputs(model, static) if static is not None else _sample_inputs(model, with_past)
        constants = _cache_constants(inputs.get("past_key_values"))
        if static is None:
            updates = contextlib.nullcontext()
        elif attention == "plain":
            updates = scatter_updates()
        else:
            updates = group_query_attention(model, inputs, every_dtype=attention == "gqa", norms_in_node=attention == "gqa-cuda")
        try:
            with (real_rotary(model), fused_export(model, fused) if fused else contextlib.nullcontext(),
                  updates as attention_plan, _grouped_kv_attention(opset)):
                exported = OnnxExporter().export(model, inputs, OnnxConfig(dynamic=static is None, opset_version=opset))
        except (RuntimeError, ValueError, TypeError) as exc:
            raise MoeFxError(f"transformers' ONNX exporter failed on {type(model).__name__}: {first_line(exc)}") from exc
        program = exported.program
        attention_plan = attention_plan or AttentionPlan({}, [], [])  # dynamic or --attention plain: nothing planned
        lowered = lower_fused_experts(program.graph, weights)
        dense = lower_dense_matmuls(program.graph, linears, quantized_dense)  # before the fusions, which pack MatMuls
        if dense:
            program.opset_imports.setdefault("com.microsoft", 1)
        if ort_fusions is not None:  # after the MoE nodes exist: the fusions leave them alone
            from transformers.exporters.onnxruntime_fusions import fuse_for_onnxruntime

            fuse_for_onnxruntime(program, ort_fusions)
        expected = sorted(how.block for how in fused)
        if sorted(lowered) != expected:
            raise MoeFxError(f"the exported graph holds fused MoE nodes for {sorted(lowered)[:3]}, expected {expected[:3]}; "
                             "please report the model family (export with --moe-op unfused meanwhile)")
        folded = _to_optimum_interface(program.graph, constants, static is not None)
        if static is not None:
            ir.passes.common.RemoveUnusedNodesPass()(program)  # the nodes that computed the dropped token-count outputs
            # every layer's token count is cache_position now: what each computed from it (GroupQueryAttention's
            # seqlens_k, a cast and an expand a layer) is computed once
            ir.passes.common.CommonSubexpressionEliminationPass()(program)
            _drop_unused_inputs(program.graph)
        _share_transposed_copies(program.graph)
        _strip_metadata(program)
        seconds = time.perf_counter() - started

        init_bytes = _initializer_bytes(program)
        with atomic_directory(out) as tmp:
            external = EXTERNAL_DATA_FILE if init_bytes > PROTOBUF_LIMIT else None
            ir.save(program, str(tmp / ONNX_FILE), external_data=external)
            if source is not None:  # the checkpoint's own config (aliases for older transformers included)
                copy_files(source, tmp, CONFIG_FILES + TOKENIZER_FILES)
                patch_config(tmp)
            else:
                write_config(model, tmp)
            parity = quantization = None
            if check:
                runner = OnnxCausalLM(tmp, device="cpu" if device == "cpu" else "auto")
                if weights != "float" or dense:
                    quantization = check_parity(model, runner)
                with (_dequantized(model, fused, weights) if weights != "float" else contextlib.nullcontext(),
                      dequantized_linears(model, {name: quantized_dense[name] for name in dense})):
                    parity = check_parity(model, runner)
                limit = _tolerance(torch_dtype, parity)
                if parity.max_abs_logit_diff > limit or (torch_dtype == torch.float32 and not parity.greedy_identical):
                    raise OnnxParityError(
                        f"the ONNX graph does not match PyTorch: max |logit diff| {parity.max_abs_logit_diff:.3g} (limit {limit:.3g}), "
                        f"greedy generation {'identical' if parity.greedy_identical else f'differs at token {parity.first_mismatch}'}; nothing written")
            result = OnnxExport(
                path=out,
                with_past=with_past,
                dtype=str(torch_dtype).removeprefix("torch."),
                inputs=[v.name for v in program.graph.inputs],
                outputs=[v.name for v in program.graph.outputs],
                initializer_bytes=init_bytes,
                parameter_bytes=model_size(model)["bytes"],
                onnx_bytes=sum(f.stat().st_size for f in tmp.glob(f"{ONNX_FILE}*")),
                export_seconds=round(seconds, 2),
                parity=parity,
                folded_constants=folded,
                weights=weights,
                fused_blocks=[how.block for how in fused],
                routed_in_operator=[how.block for how in fused if how.router is not None],
                unfused_blocks={block: how for block, how in plan.items() if isinstance(how, str)},
                quantization=quantization,
                ort_fusions=ort_fusions,
                opset=program.opset_imports.get(""),
                static=static,
                fused_attention=sorted(i for i, why in attention_plan.layers.items() if why is None),
                unfused_attention={i: why for i, why in sorted(attention_plan.layers.items()) if why is not None},
                rotary_in_node=attention_plan.rotary_in_node,
                norms_in_node=attention_plan.norms_in_node,
                dense_weights=dense_weights,
                dense_quantized=dense,
            )
            record = _source_record(source)
            record["onnx_export"] = result.to_dict()
            record["versions"] = versions()
            (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return result


def _source_record(source: Path | None) -> dict:
    """The pruning record of the checkpoint exported (what was removed), carried into the export's record."""
    if source is None or not (Path(source) / RECORD_FILE).is_file():
        return {}
    return json.loads((Path(source) / RECORD_FILE).read_text())

