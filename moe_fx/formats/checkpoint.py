"""Write a pruned model as a checkpoint that stock ``from_pretrained`` loads (transformers 5 and 4.57).

The directory is written under a temporary name beside the target and renamed into place only when
complete, so a failure never leaves a partial checkpoint. The source directory is never written to.
Besides the safetensors weights, config, tokenizer and generation config, ``moe_fx.json`` records what
was done (passes, plan, scores, calibration fingerprint, versions).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from moe_fx.environment import versions
from moe_fx.errors import BadOptionError, MoeFxError, OutputPathError
from moe_fx.evaluate.report import write_report
from moe_fx.formats import mxfp4, quantized_checkpoint
from moe_fx.formats.atomic import atomic_directory, replace_atomically
from moe_fx.formats.compressed_experts import DEFAULT_GROUP
from moe_fx.formats.ragged import ragged_experts
from moe_fx.formats.stored_format import quantization_config, saved_dense
from moe_fx.model import per_layer as per_layer_model
from moe_fx.model.adapters import COUNT_ATTRS, get_adapter
from moe_fx.model.tensors import config_at, get_tensor
from moe_fx.model.trace import trace
from moe_fx.pipeline import STATE_ATTR

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)

RECORD_FILE = "moe_fx.json"

EXPERT_STORAGE = ("auto", "padded")
"""How :func:`save_checkpoint` stores experts of different widths within a block: in width buckets, or zero-padded."""

CONFIG_FILES = ("config.json", "generation_config.json", "modeling_moe_fx.py")
"""What a runtime that brings its own graph (ONNX) needs of a checkpoint besides the tokenizer."""

AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModelForMultimodalLM", "AutoModel")
"""Auto classes a per-layer checkpoint's ``auto_map`` may name (those mapping its config to its class)."""


def check_output_path(out: str | Path, source: str | Path | None, overwrite: bool) -> Path:
    """Refuse to write into the source checkout or over an existing directory (unless ``overwrite``)."""
    out = Path(out).resolve()
    if source is not None:
        src = Path(source).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise OutputPathError(f"output {out} overlaps the source checkpoint {src}; choose another --out")
    if out.exists() and not overwrite:
        raise OutputPathError(f"output {out} already exists; choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"output {out} exists and is not a directory")
    return out


def _config_aliases(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per config path (``""``, ``"text_config"``, ...), every expert-count key older transformers may read.

    Aliases are written beside the key that holds the count, in the same (sub-)config.
    """
    state = getattr(model, STATE_ATTR, None)
    if state is not None:
        spec = state.spec
    else:  # a model moe-fx has not touched still needs the aliases (v5 writes Qwen3-MoE's count under one name)
        try:
            spec = trace(model)
        except MoeFxError:
            return {}
    n = max(b.num_experts for b in spec.blocks)
    legacy = set(get_adapter(spec.model_type).legacy_count_keys)
    out: dict[str, dict[str, int]] = {}
    for ref in spec.config_count_keys:
        path, _, key = ref.rpartition(":")
        config = config_at(model.config, path)
        aliases = getattr(config, "attribute_map", {}) or {}
        keys = {key} | {k for k, v in aliases.items() if k in COUNT_ATTRS and v == key} | legacy
        out.setdefault(path, {}).update(dict.fromkeys(keys, n))
    return out


@contextlib.contextmanager
def _edited_config(path: Path) -> Iterator[dict]:
    """The checkpoint's ``config.json`` as a dict, written back (sorted, indented) when the block ends."""
    cfg_file = path / "config.json"
    data = json.loads(cfg_file.read_text())
    yield data
    cfg_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def patch_config(path: Path, aliases: dict[str, dict[str, int]] | None = None) -> None:
    """Write the count aliases, and the rope fields transformers 4.x reads: it ignores v5's ``rope_parameters``
    and would silently fall back to its default ``rope_theta`` (10000; Qwen3 uses 1e6)."""
    with _edited_config(path) as data:
        for config_path, values in (aliases or {}).items():
            target = data
            for part in filter(None, config_path.split(".")):
                target = target[part]
            target.update(values)
        for config in [data] + [v for v in data.values() if isinstance(v, dict) and "model_type" in v]:
            rope = config.get("rope_parameters")
            if not isinstance(rope, dict) or "rope_theta" not in rope:
                continue
            config.setdefault("rope_theta", rope["rope_theta"])
            if rope.get("rope_type", "default") != "default":
                config.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})


def _patch_tokenizer_class(path: Path) -> None:
    """transformers 5 names its fast tokenizer ``TokenizersBackend``, a class 4.x lacks; ``PreTrainedTokenizerFast``
    is the same class in 5 (an alias) and loads in 4.x too."""
    file = path / "tokenizer_config.json"
    if file.is_file():
        data = json.loads(file.read_text())
        if data.get("tokenizer_class") == "TokenizersBackend":
            data["tokenizer_class"] = "PreTrainedTokenizerFast"
            file.write_text(json.dumps(data, indent=2) + "\n")


def _write_per_layer_code(model: nn.Module, path: Path) -> None:
    """For a per-layer-count model: ship the model class beside the weights and point ``auto_map`` at it, so
    ``from_pretrained(path, trust_remote_code=True)`` builds experts of the recorded shapes."""
    import transformers

    if not getattr(model.config, per_layer_model.LAYOUT_KEY, None):
        _drop_stale_auto_map(path)
        return
    base = getattr(type(model), "moe_fx_base", type(model))  # a model loaded in this format: its stock class
    cls_name = f"MoeFx{base.__name__}"
    code = Path(per_layer_model.__file__).read_text()
    code += f"\n\nfrom transformers import {base.__name__} as _Base  # noqa: E402\n\n{cls_name} = per_layer_class(_Base)\n"
    (path / "modeling_moe_fx.py").write_text(code)
    autos = [a for a in AUTO_CLASSES if getattr(transformers, a)._model_mapping.get(type(model.config), None) is base]
    with _edited_config(path) as data:
        data["auto_map"] = dict.fromkeys(autos, f"modeling_moe_fx.{cls_name}")
        data["architectures"] = [base.__name__]


def _drop_stale_auto_map(path: Path) -> None:
    """A model loaded in the per-layer format and rewritten back to stock shapes keeps the ``auto_map`` it was
    loaded with; stock shapes need no remote class, so the entries naming ours go."""
    with _edited_config(path) as data:
        kept = {k: v for k, v in (data.get("auto_map") or {}).items() if not str(v).startswith("modeling_moe_fx.")}
        if kept:
            data["auto_map"] = kept
        else:
            data.pop("auto_map", None)


def copy_files(source: str | Path, dest: Path, names: tuple[str, ...] = TOKENIZER_FILES) -> None:
    """Copy those of ``names`` the source checkpoint has (by default its tokenizer: a pruned model keeps it)."""
    for name in names:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, dest / name)
    _patch_tokenizer_class(dest)


def write_config(model: nn.Module, path: Path) -> None:
    """The config (with the aliases older transformers read) and generation config of ``model``, without weights:
    what a runtime that brings its own graph (ONNX) reads."""
    model.config.save_pretrained(path)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)
    patch_config(path, _config_aliases(model))


def save_checkpoint(
    model: nn.Module,
    out: str | Path,
    *,
    source: str | Path | None = None,
    tokenizer=None,
    overwrite: bool = False,
    extra_record: dict | None = None,
    report: bool = True,
    quantize: str | None = None,
    quantize_targets: str = "experts",
    quantize_group_size: int = DEFAULT_GROUP,
    expert_storage: str = "auto",
) -> Path:
    """Save ``model`` (and its moe-fx record) atomically to ``out``; return the final path. ``report``: also
    write ``report.md`` / ``report.json`` / ``plots/`` describing the run (from the record). A source whose experts
    are MXFP4 (GPT-OSS) gets MXFP4 experts back (:mod:`moe_fx.formats.mxfp4`; the record's ``expert_format`` says
    the bytes and the round-trip error of weights a pass changed). ``quantize="fp8-block"`` writes the experts in
    the hub's block-wise FP8 format, ``int8-channel`` / ``int4-group`` in compressed-tensors' format
    (:mod:`moe_fx.formats.quantized_checkpoint`; the record's ``quantization`` says the bytes);
    ``quantize_targets="linear"`` quantizes every other linear layer too, but the routers and the LM head
    (``"linear+head"``: the untied head too); ``quantize_group_size``: int4-group's inputs per scale (smaller where a
    pruned width needs it: :func:`~moe_fx.formats.quantized_checkpoint.quantize_directory`'s ``fit_group``). A model loaded
    dense from a quantized checkpoint is written dense (:func:`~moe_fx.formats.stored_format.saved_dense`) before
    ``quantize`` applies; :func:`~moe_fx.formats.stored_format.stored_format` says how its source was quantized.
    ``expert_storage``: ``auto`` writes experts of different widths in
    width buckets where that stores 2% fewer routed parameters or more (:mod:`moe_fx.formats.ragged`; the record's
    ``expert_storage`` says what it saved; loads through ``moe_fx.load`` or ``trust_remote_code``), ``padded``
    keeps them zero-padded to their block's widest (a stock checkpoint where the config can describe it)."""
    state = getattr(model, STATE_ATTR, None)
    if state is not None and state.masked:
        raise BadOptionError("this model's channels were zeroed in place (PruneChannels(mask_only=True), a debug mode); "
                             "run PruneChannels without mask_only to get a smaller model to save")
    check_expert_storage(expert_storage)
    out = check_output_path(out, source, overwrite)
    quantization = source_mxfp4(source)
    if quantize is not None:  # before anything is written
        quantized_checkpoint.codec(quantize, quantize_group_size)
        quantized_checkpoint.check_targets(quantize_targets)
        if quantization is not None:
            raise BadOptionError(f"the source's experts are MXFP4, which the pruned copy keeps; --quantize {quantize} does not apply to it")
    buckets = expert_storage == "auto" and quantize is None and quantization is None and state is not None and not state.masked
    itemsize = get_tensor(model, state.spec.blocks[0].experts.tensors[0]).element_size() if buckets and state.spec.blocks else 0
    with atomic_directory(out) as tmp:
        with ragged_experts(model, state.spec) if buckets else contextlib.nullcontext() as stored:
            with saved_dense(model):  # loaded dense from a quantized checkpoint: written dense, then quantized below
                model.save_pretrained(tmp, safe_serialization=True)
            if stored is not None:
                extra_record = {**(extra_record or {}), "expert_storage": stored}
                if "size_after" in extra_record:  # what the checkpoint holds, not the padded experts in memory
                    size, saved = dict(extra_record["size_after"]), stored["routed_params_padded"] - stored["routed_params_stored"]
                    size["params"] -= saved
                    size["bytes"] -= saved * itemsize
                    extra_record["size_after"] = size
            if quantization is not None:
                extra_record = {**(extra_record or {}), "expert_format": mxfp4.repack_directory(tmp, quantization)}
            if quantize is not None:
                extra_record = {**(extra_record or {}), "quantization": quantized_checkpoint.quantize_directory(
                    tmp, scheme=quantize, group_size=quantize_group_size, targets=quantize_targets, fit_group=True)}
            record = write_companions(model, tmp, source=source, tokenizer=tokenizer, extra_record=extra_record)
        if report:
            write_report(tmp, record, location=out)
    return out


def check_expert_storage(expert_storage: str) -> None:
    if expert_storage not in EXPERT_STORAGE:
        raise BadOptionError(f"expert_storage {expert_storage!r}: use one of {', '.join(EXPERT_STORAGE)}")


def source_mxfp4(source: str | Path | None) -> dict | None:
    """The source checkpoint's ``quantization_config`` when its experts are MXFP4 (what a pruned copy keeps), else None."""
    if source is None or not (Path(source) / "config.json").is_file():
        return None
    config = quantization_config(source)
    return config if mxfp4.is_mxfp4({"quantization_config": config}) else None


def read_record(path: str | Path) -> dict:
    """The ``moe_fx.json`` record of a checkpoint moe-fx wrote."""
    return json.loads((Path(path) / RECORD_FILE).read_text())


def update_record(path: str | Path, entries: dict) -> None:
    """Add ``entries`` to the ``moe_fx.json`` of a finished checkpoint (replaced whole, never half-written)."""
    file = Path(path) / RECORD_FILE
    record = read_record(path)
    record.update(entries)
    replace_atomically(file, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))


def write_companions(model: nn.Module, path: Path, *, source: str | Path | None, tokenizer=None, extra_record: dict | None = None) -> dict:
    """Everything of a checkpoint beside its weights and ``config.json`` (which ``path`` already holds): the
    tokenizer (``tokenizer``, else the source's files), the config's count aliases and rope fields for older
    transformers, the per-layer model code when needed, and the ``moe_fx.json`` record (returned)."""
    state = getattr(model, STATE_ATTR, None)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
        _patch_tokenizer_class(path)
    elif source is not None:
        copy_files(source, path)
    patch_config(path, _config_aliases(model))
    _write_per_layer_code(model, path)
    record = state.record() if state is not None else {}
    record.update(extra_record or {})
    record["versions"] = versions()
    record["source"] = str(Path(source).resolve()) if source is not None else None
    (path / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record
