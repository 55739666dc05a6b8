"""``moe-fx quantize``: a checkpoint's routed experts (and with ``--targets linear`` its other linear layers) in
block-wise FP8 (the hub's format) or int8 / int4 (compressed-tensors' format), which stock transformers and vLLM
load."""

from __future__ import annotations

from moe_fx.cli.common import add_output
from moe_fx.formats.compressed_experts import DEFAULT_GROUP
from moe_fx.formats.quantized_checkpoint import SCHEMES, TARGETS


def add_parser(sub) -> None:
    """Declare the command and its options on the ``moe-fx`` subparsers ``sub``."""
    p = sub.add_parser("quantize", help="write a (pruned) checkpoint's routed experts as FP8, int8 or int4 (formats transformers and vLLM load)")
    p.add_argument("model", help="checkpoint directory (pruned by moe-fx or stock transformers), left untouched")
    p.add_argument("--scheme", default="fp8-block", choices=SCHEMES,
                   help="fp8-block: float8_e4m3fn routed experts with one scale per 128 x 128 block (Qwen3-30B-A3B-FP8's format); "
                        "int8-channel / int4-group: compressed-tensors' int-quantized / pack-quantized formats (needs "
                        "pip install compressed-tensors); every other weight keeps its dtype unless --targets says otherwise")
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP, help="inputs per scale of int4-group (must divide every expert's input size)")
    p.add_argument("--targets", default="experts", choices=TARGETS,
                   help="experts: the routed experts only; linear: also attention, shared experts and dense MLPs (as the hub's FP8 "
                        "checkpoints store them); linear+head: also the LM head where it is not tied to the embeddings; "
                        "routers, norms and embeddings keep their dtype")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    add_output(p)


def run(args) -> int:
    """Run the command with the parsed ``args``; return the exit status."""
    from moe_fx.evaluate.table import format_table, human_bytes
    from moe_fx.formats.quantized_checkpoint import partial_blocks_note, quantize_checkpoint

    entry = quantize_checkpoint(args.model, args.out, scheme=args.scheme, group_size=args.group_size, overwrite=args.overwrite,
                                show_progress=not args.quiet, targets=args.targets)
    rows = [
        ["tensors quantized", f"{entry['tensors']} ({args.targets}; {entry['kept_in_source_dtype']} linear layers and routers keep the source dtype)"],
        ["weights on disk", f"{human_bytes(entry['bytes_before'])} -> {human_bytes(entry['bytes'])} ({entry['bytes'] / entry['bytes_before']:.3f}x)"],
        ["largest relative error", f"{entry['max_relative_error']:.2e} (one tensor's, Frobenius norm)"],
    ]
    print(format_table(["", f"{args.model} -> {args.out}"], rows, title=f"quantized ({args.scheme})"))
    if note := partial_blocks_note(entry):
        print(note)
    return 0
