"""The software stack moe-fx runs on: versions for records and ``moe-fx --version``, and the transformers
versions the test suite runs on.

moe-fx reads transformers internals (the experts-implementation registry, the ONNX exporter, weight
conversion on load, config aliases), so a transformers release can change what it relies on. CI runs the
whole suite on the pinned version (``constraints.txt``) and a broad subset on the newest release
(``scripts/test_newest.sh``); :data:`TESTED_TRANSFORMERS` is that range, and a version outside it gets one
warning line from the command line.
"""

from __future__ import annotations

from importlib import metadata

from moe_fx import __version__

TESTED_TRANSFORMERS: tuple[str, str] = ("5.23.0", "5.25.0")
"""Oldest and newest transformers release the test suite has passed on (the pin, and the newest checked)."""

STACK: tuple[str, ...] = ("torch", "transformers", "safetensors", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "optimum-onnx")
"""Distributions whose versions ``moe-fx --version`` prints (those installed)."""


def installed_version(name: str) -> str | None:
    """The installed version of distribution ``name`` (None if absent), read from its metadata without importing it."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str]:
    """moe-fx, torch and transformers versions: what a checkpoint's record says it was written with."""
    import torch
    import transformers

    return {"moe_fx": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def version_line() -> str:
    """One line for ``moe-fx --version``: moe-fx, every installed package of :data:`STACK`, the tested range."""
    found = ", ".join(f"{name} {v}" for name in STACK if (v := installed_version(name)) is not None)
    low, high = TESTED_TRANSFORMERS
    return f"moe-fx {__version__} ({found}; tested with transformers {low} to {high})"


def untested_transformers() -> str | None:
    """A one-line warning when the installed transformers is outside :data:`TESTED_TRANSFORMERS`, else None."""
    from packaging.version import Version

    installed = installed_version("transformers")
    if installed is None:
        return None
    low, high = TESTED_TRANSFORMERS
    release = Version(Version(installed).base_version)  # 5.26.0.dev0 counts as 5.26.0
    if Version(low) <= release <= Version(high):
        return None
    return (f"transformers {installed} is outside the versions moe-fx is tested with ({low} to {high}); "
            f"if something fails, try pip install 'transformers=={high}' and report the failure")
