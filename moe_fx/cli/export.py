"""``moe-fx export onnx``: ONNX in Optimum's decoder layout (or a static decode graph for CUDA graphs), checked in
onnxruntime against PyTorch."""

from __future__ import annotations

from moe_fx.cli.common import add_output, resolve_device
from moe_fx.errors import BadOptionError


def add_parser(sub) -> None:
    """Declare the command and its options on the ``moe-fx`` subparsers ``sub``."""
    p = sub.add_parser("export", help="export a (pruned) checkpoint for a runtime: onnx (onnxruntime, Optimum)")
    p.add_argument("format", choices=("onnx",), help="target format")
    p.add_argument("model", help="checkpoint directory (pruned by moe-fx or stock transformers)")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    past = p.add_mutually_exclusive_group()
    past.add_argument("--with-past", dest="with_past", action="store_true", default=True,
                      help="KV-cache inputs and outputs for generation (default; Optimum's decoder layout)")
    past.add_argument("--no-past", dest="with_past", action="store_false", help="logits from the whole sequence only")
    p.add_argument("--dtype", default="float32", help="graph precision: float32 (default), float16, bfloat16")
    p.add_argument("--opset", type=int, help="ONNX opset (default: transformers' exporter's, 20); 23 or 24 export attention as "
                   "ONNX's Attention op on the cache's own key/value heads (faster on onnxruntime-gpu)")
    p.add_argument("--moe-op", choices=("fused", "unfused"),
                   help="routed experts as one onnxruntime com.microsoft.MoE node per block (fused) or as plain ONNX ops "
                        "(unfused); default: fused where onnxruntime has a kernel for the graph's dtype on the checking device")
    p.add_argument("--weights", choices=("float", "int8", "int4"), default="float",
                   help="precision of the fused nodes' expert weights: float (the graph's dtype), int8 (one scale per row) "
                        "or int4 (blocks of up to 128 inputs), as onnxruntime's QMoE (default float)")
    p.add_argument("--dense-weights", choices=("float", "int4"), default="float",
                   help="precision of the dense linear layers (attention projections, dense and shared-expert MLPs, the LM head; "
                        "not the routers): int4 as onnxruntime's MatMulNBits (blocks of up to 128 inputs; default float)")
    p.add_argument("--ort-fusions", choices=("cpu", "cuda"),
                   help="also fuse attention, rotary embeddings and norms into onnxruntime's own ops for this provider "
                        "(transformers' onnxruntime fusions); default: none")
    p.add_argument("--static-cache", type=int, metavar="LEN",
                   help="export a one-token decode graph of fixed shapes over a KV cache of LEN slots, which onnxruntime "
                        "replays as one CUDA graph (run it with moe_fx.deliver.onnx.OnnxDecoder); default: the dynamic graph "
                        "in Optimum's layout")
    p.add_argument("--batch-size", type=int, default=1, help="rows of a --static-cache graph (default 1)")
    p.add_argument("--attention", choices=("gqa", "gqa-cuda", "plain"),
                   help="a --static-cache graph's attention: onnxruntime's GroupQueryAttention node per layer (cache update "
                        "and attention in one kernel; rows of one length, no padding mask) where it expresses the layer; "
                        "gqa-cuda: the node also applies per-head q/k norms (Qwen3's), which only onnxruntime's CUDA kernel runs; "
                        "plain: the model's own ops; default: gqa for float16/bfloat16 graphs, plain for float32")
    p.add_argument("--model-routing", action="store_true",
                   help="keep the model's routing ops (softmax, top-k, ...) in the graph for every fused block; by default "
                        "blocks whose router is softmax -> top-k hand the router's logits to the MoE node, which routes itself")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-PyTorch parity check")
    p.add_argument("--device", default="cpu", help="device the model is traced and checked on (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    add_output(p)


def run(args) -> int:
    """Run the command with the parsed ``args``; return the exit status."""
    from moe_fx.deliver.onnx.export import export_onnx
    from moe_fx.deliver.onnx.static_decode import StaticShape
    from moe_fx.evaluate.table import format_table, human_bytes

    if args.static_cache is None and args.batch_size != 1:
        raise BadOptionError(f"--batch-size {args.batch_size} fixes the batch of a --static-cache graph; the dynamic export takes any batch")
    static = StaticShape(args.batch_size, args.static_cache) if args.static_cache is not None else None
    result = export_onnx(args.model, args.out, with_past=args.with_past, dtype=args.dtype, opset=args.opset,
                         check=not args.no_check, device=resolve_device(args.device), overwrite=args.overwrite,
                         moe_op=args.moe_op, weights=args.weights, ort_fusions=args.ort_fusions, static=static,
                         operator_routing=not args.model_routing, attention=args.attention, dense_weights=args.dense_weights)
    rows = [
        ["graph inputs", f"{len(result.inputs)} ({', '.join(result.inputs[:3])}{', past_key_values.*' if result.with_past else ''})"],
        ["weights in graph", f"{human_bytes(result.initializer_bytes)} (model parameters: {human_bytes(result.parameter_bytes)})"],
        ["files", human_bytes(result.onnx_bytes)],
        ["MoE blocks", _moe_summary(result)],
        *([["dense layers", f"{len(result.dense_quantized)} as com.microsoft.MatMulNBits int4"]] if result.dense_quantized else []),
        ["export time", f"{result.export_seconds:.1f} s"],
    ]
    if static is not None:
        norms = f", {len(result.norms_in_node)} with their q/k norms" if result.norms_in_node else ""
        rotary = f" ({len(result.rotary_in_node)} rotating q and k{norms})" if result.rotary_in_node else ""
        rows.append(["attention", _summary(result.fused_attention, result.unfused_attention, "as com.microsoft.GroupQueryAttention", rotary)])
        rows.append(["static decode graph", f"batch {static.batch_size}, {static.max_cache_len}-token cache, one token a step: run it with "
                     "OnnxDecoder (CUDA graphs); Optimum's ORTModelForCausalLM needs the dynamic export"])
    if result.parity is not None:
        par = result.parity
        dequantized = [part for part, fmt in (("experts", result.weights), ("dense layers", result.dense_weights)) if fmt != "float"]
        against = f" (vs the dequantized {' and '.join(dequantized)})" if dequantized else ""
        rows += [["max |logit diff|", f"{par.max_abs_logit_diff:.2e} over {par.steps_checked} steps (largest logit {par.logit_scale:.1f}){against}"],
                 ["greedy generation", f"{par.generated_tokens} tokens, " + ("identical" if par.greedy_identical else f"differs at token {par.first_mismatch}")]]
    if result.quantization is not None:
        q = result.quantization
        formats = "/".join(sorted({fmt for fmt in (result.weights, result.dense_weights) if fmt != "float"}))
        rows.append([f"{formats} vs float model", f"max |logit diff| {q.max_abs_logit_diff:.2e}, greedy "
                     + ("identical" if q.greedy_identical else f"differs at token {q.first_mismatch}")])
    title = f"ONNX export ({result.dtype}, opset {result.opset}, onnxruntime parity checked: {result.parity is not None})"
    print(format_table(["", f"{args.model} -> {result.path}"], rows, title=title))
    return 0


def _summary(fused: list, unfused: dict, as_node: str, detail: str = "") -> str:
    """How many parts are fused nodes, and why the others are not (the first reason, with how many share it)."""
    text = (f"{len(fused)} {as_node}" if fused else "none fused") + detail
    if unfused:
        reasons = list(unfused.values())
        text += f"; {len(reasons)} as plain ops ({reasons[0]}" + (f", and {len(set(reasons)) - 1} other reasons" if len(set(reasons)) > 1 else "") + ")"
    return text


def _moe_summary(result) -> str:
    """Which blocks are fused MoE nodes, and why the others are not."""
    op = "QMoE " + result.weights if result.weights != "float" else "MoE"
    routing = f" ({len(result.routed_in_operator)} routing in the node)" if result.routed_in_operator else ""
    return _summary(result.fused_blocks, result.unfused_blocks, f"as com.microsoft.{op}", routing)
