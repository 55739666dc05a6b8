"""The package layout by stage: no import cycles, lower stages never import higher ones at module level (but
for the documented exceptions), and the old module paths of 0.1.x still import, with a warning."""

from __future__ import annotations

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

import moe_fx
from moe_fx._moved import MOVED

PACKAGE = Path(moe_fx.__file__).parent
STAGES = ["errors", "progress", "environment", "_moved", "kernels", "model", "pipeline", "calibrate", "score", "plan", "rewrite",
          "formats", "evaluate", "deliver", "passes", "run", "cli"]
"""Stages in data-flow order (docs/concepts.md): a module may import from its own stage and earlier ones."""
ALLOWED_UPWARD = {
    ("moe_fx.formats.checkpoint", "moe_fx.evaluate.report"),  # a checkpoint is written with its report
    ("moe_fx.plan.eep", "moe_fx.rewrite.drop_experts"),  # the search measures really pruned candidates
    ("moe_fx.plan.eep", "moe_fx.evaluate.nll"),
    ("moe_fx.plan.choose", "moe_fx.evaluate.nll"),  # the choice between recipes measures their pruned models
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports() -> dict[str, set[str]]:
    """Module -> the moe_fx modules it imports at module level (not inside functions)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("moe_fx"):
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("moe_fx")}
        edges[name] = targets & set(modules)
    return edges


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "moe_fx"


def test_no_import_cycles():
    edges = _top_level_imports()
    visiting, done = set(), set()

    def visit(m: str, path: list[str]) -> None:
        if m in done:
            return
        assert m not in visiting, f"import cycle: {' -> '.join(path + [m])}"
        visiting.add(m)
        for t in sorted(edges[m]):
            if t != m and not m.startswith(t + ".") and t != "moe_fx":  # a submodule importing its package's siblings
                visit(t, path + [m])
        visiting.discard(m)
        done.add(m)

    for m in sorted(edges):
        visit(m, [])


def test_lower_stages_do_not_import_higher_ones():
    upward = []
    for module, targets in _top_level_imports().items():
        stage = _stage(module)
        for target in targets:
            if stage in STAGES and _stage(target) in STAGES and STAGES.index(_stage(target)) > STAGES.index(stage):
                if (module, target) not in ALLOWED_UPWARD:
                    upward.append(f"{module} -> {target}")
    assert not upward, upward


def test_every_stage_folder_is_listed():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders <= set(STAGES)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_import_paths_still_work(old):
    if old.endswith("triton_kernels"):
        pytest.importorskip("triton")  # the Triton kernels import triton, which CPU builds of torch lack
    sys.modules.pop(old, None)  # imported by an earlier test: import it afresh
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])
    assert module.__name__ == MOVED[old] and module.__spec__.name == MOVED[old]  # the real module, not a copy
    assert any(issubclass(w.category, DeprecationWarning) and MOVED[old] in str(w.message) for w in caught)
