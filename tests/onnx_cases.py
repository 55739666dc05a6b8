"""ONNX exports that test_onnx.py and test_onnx_fused.py both check (each from its own angle), made once per
session through conftest's ``once``: an export is seconds of tracing even for a tiny model. Returned objects
are shared: read them, never modify them."""

from __future__ import annotations

from conftest import tiny_qwen3
from test_channels import _random_plan
from test_families import kept_ids, tiny_model

from moe_fx import PrunePlan
from moe_fx.deliver.onnx import export as onnx_export
from moe_fx.formats import save_checkpoint
from moe_fx.model.trace import trace
from moe_fx.passes import DropExperts, PruneChannels

WINDOW = 6
"""The sliding window (or attention chunk: Llama 4's) given to models that have one: shorter than the 12 + 16 tokens
of the export's parity check and the runners' tests, so that every one of them crosses it (the tiny configs keep
the family's 128 and 8,192)."""


def first_layer_pruned(family: str):
    """The family's tiny model in float32, its first MoE layer pruned to the odd experts (per-layer expert counts), a
    sliding window or attention chunk shortened to :data:`WINDOW`."""
    model = tiny_model(family).float()
    text = model.config.get_text_config()
    if getattr(text, "attention_chunk_size", None):
        text.attention_chunk_size = WINDOW
    if getattr(model.config, "sliding_window", None):
        model.config.sliding_window = WINDOW
        for module in model.modules():
            if getattr(module, "sliding_window", None):
                module.sliding_window = WINDOW
    spec = trace(model)
    DropExperts(plan=PrunePlan({spec.blocks[0].path: kept_ids(spec)}))(model)
    return model


def pruned_family_export(once, family: str):
    """(model, checkpoint, export): :func:`first_layer_pruned`, saved, exported from the directory with a past
    (default options: fused MoE nodes where the operator expresses the block, parity checked)."""

    def build(tmp):
        model = first_layer_pruned(family)
        ckpt = save_checkpoint(model, tmp / "pruned")
        return model, ckpt, onnx_export.export_onnx(ckpt, tmp / "onnx")

    return once(f"pruned-{family}", build)


def channel_pruned_export(once):
    """(model, export): tiny Qwen3 with per-expert channel widths (padded to each layer's widest), its first layer
    left with 4 channels an expert and one expert with none (dropped); exported without a past."""

    def build(tmp):
        model = tiny_qwen3()
        plan = _random_plan(trace(model), 0.5, seed=1, vary=True)
        first = trace(model).blocks[0].path
        plan.kept_channels[first] = [c[:4] for c in plan.kept_channels[first]]
        plan.kept_channels[first][2] = []  # an expert left with no channel is dropped
        PruneChannels(plan=plan)(model)
        return model, onnx_export.export_onnx(model, tmp / "onnx", with_past=False)

    return once("channel-pruned", build)


def float16_export(once):
    """Tiny Qwen3 exported in float16 with a past, checked on the CPU (default MoE option)."""
    return once("float16", lambda tmp: onnx_export.export_onnx(tiny_qwen3(), tmp / "onnx", dtype="float16"))
