"""Tensor-level rewrite helpers shared by the rewrite passes: get and replace named tensors, set counts."""

from __future__ import annotations

import torch
from torch import nn


def get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    mod_path, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(mod_path), attr)


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a parameter or buffer by ``value``, keeping its kind, ``requires_grad`` and persistence."""
    mod_path, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_path)
    old = getattr(mod, attr)
    if isinstance(old, nn.Parameter):
        setattr(mod, attr, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        mod.register_buffer(attr, value, persistent=attr not in mod._non_persistent_buffers_set)


def set_attr(model: nn.Module, ref: str, value: int) -> None:
    """Set ``module_path:attribute`` (as recorded in a spec) to ``value``."""
    mod_path, _, attr = ref.rpartition(":")
    setattr(model.get_submodule(mod_path), attr, value)


def config_at(config, path: str):
    """The (sub-)config at ``path`` (``""`` for the root, ``text_config``, dotted for deeper ones)."""
    for part in filter(None, path.split(".")):
        config = getattr(config, part)
    return config


def get_config_key(config, ref: str):
    """The value of ``config_path:key`` (as recorded in a spec) on a nested config."""
    path, _, key = ref.rpartition(":")
    return getattr(config_at(config, path), key)


def set_config_key(config, ref: str, value) -> None:
    """Set ``config_path:key`` (``text_config:num_experts``, ``:num_local_experts``) on a nested config."""
    path, _, key = ref.rpartition(":")
    setattr(config_at(config, path), key, value)
