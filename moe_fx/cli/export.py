"""``moe-fx export onnx``: ONNX in Optimum's decoder layout, checked in onnxruntime against PyTorch."""

from __future__ import annotations

from moe_fx.cli.common import add_output, resolve_device


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
    p.add_argument("--opset", type=int, help="ONNX opset (default: the newest onnxscript writes)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-PyTorch parity check")
    p.add_argument("--device", default="cpu", help="device the model is traced and checked on (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    add_output(p)


def run(args) -> int:
    """Run the command with the parsed ``args``; return the exit status."""
    from moe_fx.deliver.onnx.export import export_onnx
    from moe_fx.evaluate.table import format_table, human_bytes

    result = export_onnx(args.model, args.out, with_past=args.with_past, dtype=args.dtype, opset=args.opset,
                         check=not args.no_check, device=resolve_device(args.device), overwrite=args.overwrite)
    rows = [
        ["graph inputs", f"{len(result.inputs)} ({', '.join(result.inputs[:3])}{', past_key_values.*' if result.with_past else ''})"],
        ["weights in graph", f"{human_bytes(result.initializer_bytes)} (model parameters: {human_bytes(result.parameter_bytes)})"],
        ["files", human_bytes(result.onnx_bytes)],
        ["export time", f"{result.export_seconds:.1f} s"],
    ]
    if result.parity is not None:
        par = result.parity
        rows += [["max |logit diff|", f"{par.max_abs_logit_diff:.2e} over {par.steps_checked} steps (largest logit {par.logit_scale:.1f})"],
                 ["greedy generation", f"{par.generated_tokens} tokens, " + ("identical" if par.greedy_identical else f"differs at token {par.first_mismatch}")]]
    print(format_table(["", f"{args.model} -> {result.path}"], rows, title=f"ONNX export ({result.dtype}, onnxruntime parity checked: {result.parity is not None})"))
    return 0
