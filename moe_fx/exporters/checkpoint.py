"""Write a pruned model as a checkpoint that stock ``from_pretrained`` loads (transformers 5 and 4.57).

The directory is written under a temporary name beside the target and renamed into place only when
complete, so a failure never leaves a partial checkpoint. The source directory is never written to.
Besides the safetensors weights, config, tokenizer and generation config, ``moe_fx.json`` records what
was done (passes, plan, scores, calibration fingerprint, versions).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..adapters import COUNT_ATTRS, get_adapter
from ..errors import BadOptionError, OutputPathError
from ..pipeline import STATE_ATTR
from ..rewrite import config_at
from . import per_layer_model

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
    if state is None:
        return {}
    n = max(b.num_experts for b in state.spec.blocks)
    legacy = set(get_adapter(state.spec.model_type).legacy_count_keys)
    out: dict[str, dict[str, int]] = {}
    for ref in state.spec.config_count_keys:
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


def _patch_config(path: Path, aliases: dict[str, dict[str, int]]) -> None:
    if not aliases:
        return
    with _edited_config(path) as data:
        for config_path, values in aliases.items():
            target = data
            for part in filter(None, config_path.split(".")):
                target = target[part]
            target.update(values)


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


def _normal_permissions(path: Path) -> None:
    """mkdtemp makes a private (0700) directory; give the checkpoint the permissions of a normal mkdir."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    for f in path.iterdir():
        os.chmod(f, 0o666 & ~umask)


def _versions() -> dict[str, str]:
    import transformers

    return {"moe_fx": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def save_checkpoint(
    model: nn.Module,
    out: str | Path,
    *,
    source: str | Path | None = None,
    tokenizer=None,
    overwrite: bool = False,
    extra_record: dict | None = None,
) -> Path:
    """Save ``model`` (and its moe-fx record) atomically to ``out``; return the final path."""
    state = getattr(model, STATE_ATTR, None)
    if state is not None and state.masked:
        raise BadOptionError("this model's channels were zeroed in place (PruneChannels(mask_only=True), a debug mode); "
                             "run PruneChannels without mask_only to get a smaller model to save")
    out = check_output_path(out, source, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        elif source is not None:
            for name in TOKENIZER_FILES:
                if (Path(source) / name).is_file():
                    shutil.copy2(Path(source) / name, tmp / name)
        _patch_config(tmp, _config_aliases(model))
        _write_per_layer_code(model, tmp)
        record = state.record() if state is not None else {}
        record.update(extra_record or {})
        record["versions"] = _versions()
        record["source"] = str(Path(source).resolve()) if source is not None else None
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        _normal_permissions(tmp)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
