"""``moe-fx inspect``: describe every MoE block of a checkpoint (and check the spec against the block's graph)."""

from __future__ import annotations

import json

from moe_fx.cli.common import add_common, resolve_device
from moe_fx.errors import BadOptionError
from moe_fx.model.trace import substituted


def add_parser(sub) -> None:
    """Declare the command and its options on the ``moe-fx`` subparsers ``sub``."""
    p = sub.add_parser("inspect", help="describe every MoE block of a checkpoint")
    p.add_argument("model", help="checkpoint directory (transformers format)")
    p.add_argument("--verify", action="store_true", help="check each block's routing spec against its torch.export graph")
    p.add_argument("--all-blocks", action="store_true", help="with --verify: check every block, not one per block class")
    p.add_argument("--json", action="store_true", help="print the spec as JSON")
    add_common(p)


def run(args) -> int:
    """Run the command with the parsed ``args``; return the exit status."""
    from moe_fx.evaluate.table import format_table
    from moe_fx.formats.loading import load_model
    from moe_fx.formats.ragged import pad_buckets_
    from moe_fx.pipeline import state_of

    # held as stored first: a checkpoint with substituted experts has no padded form to trace
    model = load_model(args.model, dtype=args.dtype, device=resolve_device(args.device), ragged=True)
    if substituted(model):
        return _describe_substituted(args, model)
    pad_buckets_(model)  # width buckets: the spec describes the padded experts that passes rewrite
    spec = state_of(model).spec
    stored = _stored_weights(args.model)
    if args.json:
        print(json.dumps(spec.to_dict() | {"stored_weights": stored}, indent=2))
        return 0
    rows = spec.summary_rows()
    print(format_table(list(rows[0]), [list(r.values()) for r in rows], title=f"{args.model}: {spec.model_type} ({spec.family} adapter), {len(spec.blocks)} MoE blocks of {spec.num_layers} layers"))
    print(f"dense layers: {list(spec.dense_layers) or 'none'}")
    keys = [ref.removeprefix(":").replace(":", ".") for ref in spec.config_count_keys]  # "sub_config:key"; "" is the top
    print(f"config keys holding the expert count: {', '.join(keys) or 'none'}")
    b = spec.blocks[0]
    print(f"per-expert tensors (block 0): {', '.join(b.per_expert_tensors)}")
    print(f"stored weights: {stored}")
    if b.shared:
        print(f"shared experts (block 0): {', '.join(s.path for s in b.shared)}")
    if args.verify:
        from moe_fx.model.fx_check import verify

        checks = verify(model, spec, all_blocks=args.all_blocks)
        vrows = [[c.block, "ok" if c.ok else "MISMATCH", c.graph.score_fn if c.graph else "-", c.graph.top_k if c.graph else "-", "; ".join(c.mismatches) or (c.error or "")] for c in checks]
        print(format_table(["block", "fx check", "graph score", "graph top_k", "details"], vrows, title="torch.export graph check"))
        return 0 if all(c.ok for c in checks) else 1
    return 0


def _stored_weights(path: str) -> str:
    """How the checkpoint stores its weights: a quantized format moe-fx writes and what it covers, MXFP4 experts
    (GPT-OSS), or dense; inspect loads every one dequantized, so the table alone would not say."""
    from moe_fx.formats.checkpoint import source_mxfp4
    from moe_fx.formats.stored_format import stored_format

    fmt = stored_format(path)
    if fmt is not None:
        groups = f", groups of {fmt.group_size}" if fmt.scheme == "int4-group" else ""
        return f"{fmt.scheme} ({'routed experts' if fmt.targets == 'experts' else fmt.targets}{groups})"
    return "mxfp4 (routed experts)" if source_mxfp4(path) is not None else "not quantized"


def _describe_substituted(args, model) -> int:
    """A MoNE checkpoint (some experts substituted by constants): each block's router experts, held experts and
    substituted ones. It has no canonical spec (its routers route to more experts than its experts modules hold),
    so there is no graph to check against."""
    from moe_fx.evaluate.table import format_table
    from moe_fx.model.per_layer import NoviceExperts

    if args.verify:
        raise BadOptionError(f"{args.model}: --verify checks a canonical spec, which a checkpoint with substituted experts (MoNE) "
                             "has none of; inspect it without --verify, or verify the source model")
    rows = [{"block": path, "router experts": len(m.novice_slot), "held experts": int((m.novice_slot >= 0).sum()),
             "substituted": int((m.novice_slot < 0).sum())}
            for path, m in model.named_modules() if isinstance(m, NoviceExperts)]
    if args.json:
        print(json.dumps({"model_type": model.config.model_type, "substituted_blocks": rows}, indent=2))
        return 0
    print(format_table(list(rows[0]), [list(r.values()) for r in rows],
                       title=f"{args.model}: {model.config.model_type}, experts substituted by constants (MoNE) in {len(rows)} blocks"))
    print("blocks not listed hold all their router's experts; moe-fx does not rewrite, quantize, compile or export this "
          "checkpoint (run those on the source model)")
    return 0
